r"""The embedded default: LW against the baselines on a small `digits` training set, offline.

The 8x8 handwritten digits that ship with scikit-learn, built once as a local TFDS dataset
(no download), 200 class-balanced training examples, the fixed 500-example test split,
SimpleCNN. Three runs: `baseline` (one stage), `lw` (7 stages: K = 6 conv blocks + head) and
`baseline_long` (one schedule as long as LW's seven stages).

  python -m launch.sweep --config=configs/digits.py --workdir=runs/digits

Expected: a few minutes on 2 CPU cores; prints each run's test accuracy and a table.
One run alone: python -m launch.main --config=configs/digits.py:method=lw --workdir=runs/lw
"""

from configs import benchmark


def get_config(arg: str | None = None):
  """`configs/benchmark.py` for digits + simple_cnn, sized for a laptop; `arg` as there."""
  spec = benchmark.parse_arg(arg, dataset="digits", model="simple_cnn", method="lw")
  config = benchmark.get_config(",".join(f"{k}={v}" for k, v in spec.items()))
  config.train_examples = 200
  config.batch_size = 32
  config.epochs_per_stage = 15
  config.learning_rate = 0.05
  config.log_every_steps = 20
  return config


def get_sweep(arg: str | None = None) -> list[dict]:
  """The runs of the quick start: one seed of each method compared."""
  del arg
  return [dict(method="baseline"), dict(method="baseline_long"), dict(method="lw")]
