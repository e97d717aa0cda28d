r"""One run: `python -m launch.main --config=configs/benchmark.py:KEY=VALUE,... --workdir=DIR`.

Example (offline, about a minute on 2 CPU cores):

  python -m launch.main \
    --config=configs/benchmark.py:dataset=digits,model=simple_cnn,method=lw \
    --workdir=runs/digits_lw --config.seed=1

Writes DIR/results.json and TensorBoard summaries. A user error (unknown dataset, model or
method, a bad value, data that is not prepared) prints one line naming the field and the
accepted values and exits with status 2, without writing anything.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config: FILE.py:ARGS.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results and summaries.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: call jax.distributed.initialize() first (TPU pods, "
    "Slurm; see launch/tpu_pod.sh and launch/slurm_gpu.sh).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _DISTRIBUTED.value:
    common.initialize_distributed()
  results = common.run_or_exit(_CONFIG.value, _WORKDIR.value)
  logging.info("test accuracy %.4f", results["test_accuracy"])
  if jax_process_index() == 0:
    print(f"{results['method']}: test accuracy {results['test_accuracy']:.4f} "
          f"(train {results['train_accuracy']:.4f}) -> {_WORKDIR.value}/results.json")


def jax_process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


if __name__ == "__main__":
  sys.exit(common.run_app(main))
