"""Test setup: 8 CPU devices (multi-device paths run on CPU), quiet TF, tiny shapes."""

import os

# Must happen before jax initializes its backends: every test process gets 8 host devices, so
# sharding and multi-device tests run on a laptop or CI machine.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
