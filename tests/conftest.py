"""Test setup: 8 CPU devices (multi-device paths run on CPU), quiet TF, tiny shapes."""

import os
import tempfile

# Must happen before jax initializes its backends: every test process gets 8 host devices, so
# sharding and multi-device tests run on a laptop or CI machine.
# Test programs run a few times on tiny inputs, so XLA's CPU backend optimizations cost far more
# compile time than they save; semantics are unchanged.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0"
                           + " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests build the same tiny programs many times (every run compiles its train step); JAX's
# persistent compilation cache turns all but the first compile of each into a file read.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "reinit-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
