"""Test setup: 8 CPU devices (multi-device paths run on CPU), quiet TF, tiny shapes."""

import os
import tempfile

import pytest

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


@pytest.fixture(scope="session")
def mock_tfds(tmp_path_factory):
  """`mock_tfds(*names, num_examples=N)`: a `tfds.testing.mock_data` context for TFDS datasets.

  The pipelines only read prepared datasets (`builder.is_prepared()`: the variant dir holds
  `dataset_info.json` and `features.json`). So the metadata each builder's code defines is
  written to a data dir, and `mock_data` is given that dir: its builders then read the real
  metadata there and serve `num_examples` random examples per split, nothing else on disk.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds_metadata"))

  def mock(*names, num_examples):
    for name in names:
      builder = tfds.builder(name, data_dir=data_dir)  # code only: no download
      if not builder.is_prepared():
        os.makedirs(builder.data_dir, exist_ok=True)
        builder.info.write_to_directory(builder.data_dir)
    return tfds.testing.mock_data(num_examples=num_examples, data_dir=data_dir)

  return mock
