r"""One run of the benchmark: a dataset, an architecture and a method.

Run (offline, about a minute on 2 CPU cores):

  python -m launch.main \
    --config=configs/benchmark.py:dataset=digits,model=simple_cnn,method=lw \
    --workdir=runs/digits_lw

Any field can be overridden after that, e.g. `--config.seed=1 --config.train_examples=500
--config.num_stages=3 --config.data_dir=/data/tfds --config.label_noise=0.2`. `dataset` is a key
of `DATASETS` (reinit/data/registry.py), any TFDS name prepared in `data_dir`, or `folder:ROOT`
for a folder of images per class (ROOT/SPLIT/CLASS/*.png|jpg; set `image_size`). Classes and
shapes are always read from the builder's info.
"""

import ml_collections
from ml_collections import config_dict

from reinit.data.registry import Benchmark
from reinit.data.registry import DATASETS


def parse_arg(arg: str | None, **defaults) -> dict[str, str]:
  """'dataset=digits,model=simple_cnn' -> dict over `defaults`; unknown keys are refused."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config argument {item!r} is not KEY=VALUE with KEY in "
                       f"{', '.join(defaults)}")
    values[key] = value
  return values


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The run's config; `arg` is `dataset=...,model=...,method=...` (all optional)."""
  spec = parse_arg(arg, dataset="digits", model="simple_cnn", method="lw")

  config = ml_collections.ConfigDict()
  config.dataset = spec["dataset"]
  config.model = spec["model"]
  config.method = spec["method"]

  # Data. A key of DATASETS fills these in; any other TFDS name (or folder:ROOT) uses the
  # defaults below.
  bench = DATASETS.get(spec["dataset"]) or Benchmark(
      spec["dataset"], "train", "test", None, "none", None)
  config.tfds_name = bench.tfds_name
  config.data_dir = config_dict.placeholder(str)
  config.train_split = bench.train_split
  config.test_split = bench.test_split
  config.image_size = config_dict.placeholder(int)
  config.image_size = bench.image_size
  config.augment = bench.augment
  config.train_examples = config_dict.placeholder(int)  # None: the whole train split
  config.train_examples = bench.train_examples
  config.train_fraction = config_dict.placeholder(float)  # when train_examples is None or -1
  config.subset_seed = config_dict.placeholder(int)  # subset and label noise; None: seed
  config.label_noise = 0.0  # fraction of the training subset given a wrong label, in [0, 1)

  # Model.
  config.width = 1.0  # channel multiplier
  config.compute_dtype = "float32"  # params stay float32
  config.conv = "auto"  # auto (xla for one run, im2col for a group of runs), xla, or im2col

  # Optimization: SGD with Nesterov momentum, per-stage warmup + cosine schedule.
  config.seed = 0
  config.batch_size = 64
  config.eval_batch_size = 256
  config.epochs_per_stage = 30
  config.num_stages = -1  # total stages incl. the first; -1: all the method defines
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 5e-4  # on kernels only
  config.warmup_epochs = 1.0
  config.label_smoothing = 0.0

  # Stage policy, for every method (see README, "Methods").
  config.reset_optimizer = "fresh"  # fresh: new optimizer state per stage; masked: zero it
                                    # only where the switch changed params
  config.restart_schedule = True    # restart warmup + cosine every stage, else one schedule
  config.compare_with = "lw"        # the method whose compute baseline_long and restarts match

  # Method knobs, with their sources (README, "Methods").
  config.lw = ml_collections.ConfigDict(dict(
      rescale=True,             # rescale kept units to their norms at initialization
      normalize=True,           # standardize the output of the top kept unit
      reset_batch_stats=True,   # reinitialize running BN statistics of the reset units
      rescale_zero_init=True,   # zero-initialized leaves (BN biases) to zero, as LLF's LW does
      calibration_batches=4,    # training batches for the standardization statistics
      earlier_standardizations="off",  # earlier stages' standardizations: off, on (LLF's
                                       # LW), fold (into the next unit's conv)
      rescale_batch_stats=True,  # scale running BN statistics with their rescaled kernels
  ))
  config.llf = ml_collections.ConfigDict(dict(
      reset_from="-3",          # first reset unit: a name, or an index (-3: last two blocks + head)
      reset_batch_stats=True,
  ))
  config.ke = ml_collections.ConfigDict(dict(
      split_rate=0.5,               # fraction kept (fit hypothesis); KE/LLF fork default
      split_granularity="weight",   # weight (WELS) or filter (KELS)
  ))
  config.rand = ml_collections.ConfigDict(dict(fraction=0.5))  # reset per stage, re-drawn
  config.sp = ml_collections.ConfigDict(dict(  # Ash & Adams 2020
      shrink=0.4, perturb=0.1,
      # True: running BN statistics from the fresh init, as their code (its blended network is
      # a fresh one); off by default: in 40-step stages the reset variance (1) does not decay
      # below the shrunk layers' (~0.003): every digits sp run evaluated at chance (README).
      reset_batch_stats=False,
  ))
  config.dsd = ml_collections.ConfigDict(dict(
      sparsity=0.3,   # pruned fraction per layer (Han et al. 2017 used 30% for ResNets)
      lr_factor=0.1,  # learning rate of the final dense stage, relative
  ))

  # Devices and bookkeeping.
  config.num_devices = -1  # devices of the data-parallel mesh; -1: all
  config.log_every_steps = 50
  config.checkpoint_every_steps = 0  # 0: only at stage ends, which are always checkpointed
  return config


def get_sweep(arg: str | None = None) -> list[dict]:
  """The runs of `launch.sweep` for this config: the baseline and LW, one seed."""
  del arg
  return [dict(method="baseline"), dict(method="lw")]
