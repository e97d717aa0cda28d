r"""One run of the benchmark: a dataset, an architecture and a method.

Run (offline, about a minute on 2 CPU cores):

  python -m launch.main \
    --config=configs/benchmark.py:dataset=digits,model=simple_cnn,method=lw \
    --workdir=runs/digits_lw

Any field can be overridden after that, e.g. `--config.seed=1 --config.train_examples=500
--config.num_stages=3 --config.data_dir=/data/tfds`. `dataset` is a key of `DATASETS` below or
any TFDS name prepared in `data_dir` (classes and shapes are read from the builder's info).
"""

import ml_collections
from ml_collections import config_dict

from reinit import methods
from reinit import models

# key: (TFDS name, train split, test split, image size, augmentation, default train_examples)
# Image size None keeps the native size. Sizes of the full splits are in the README.
DATASETS = {
    "digits": ("digits", "train", "test", None, "none", 200),
    "cifar10": ("cifar10", "train", "test", 32, "crop_flip", None),
    "cifar100": ("cifar100", "train", "test", 32, "crop_flip", None),
    "svhn": ("svhn_cropped", "train", "test", 32, "crop", None),
    "fashion_mnist": ("fashion_mnist", "train", "test", 32, "crop_flip", None),
    "caltech101": ("caltech101", "train", "test", 64, "crop_flip", None),
    "birds": ("caltech_birds2011", "train", "test", 64, "crop_flip", None),
    "dtd": ("dtd", "train+validation", "test", 64, "crop_flip", None),
    "flowers": ("oxford_flowers102", "train+validation", "test", 64, "crop_flip", None),
    "pets": ("oxford_iiit_pet", "train", "test", 64, "crop_flip", None),
    "dogs": ("stanford_dogs", "train", "test", 64, "crop_flip", None),
    "eurosat": ("eurosat/rgb", "train[:80%]", "train[80%:]", 64, "crop_flip", None),
    "colorectal": ("colorectal_histology", "train[:80%]", "train[80%:]", 64, "crop_flip", None),
}



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


def _check_choice(field: str, value: str, accepted) -> None:
  if value not in accepted:
    raise ValueError(f"{field}={value!r} is unknown; accepted: {', '.join(accepted)}")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The run's config; `arg` is `dataset=...,model=...,method=...` (all optional)."""
  spec = parse_arg(arg, dataset="digits", model="simple_cnn", method="lw")
  _check_choice("model", spec["model"], sorted(models.MODELS))
  _check_choice("method", spec["method"], methods.METHODS)

  config = ml_collections.ConfigDict()
  config.dataset = spec["dataset"]
  config.model = spec["model"]
  config.method = spec["method"]

  # Data. A key of DATASETS fills these in; any other TFDS name uses the defaults below.
  tfds_name, train_split, test_split, image_size, augment, train_examples = DATASETS.get(
      spec["dataset"], (spec["dataset"], "train", "test", None, "none", None))
  config.tfds_name = tfds_name
  config.data_dir = config_dict.placeholder(str)
  config.train_split = train_split
  config.test_split = test_split
  config.image_size = config_dict.placeholder(int)
  config.image_size = image_size
  config.augment = augment
  config.train_examples = config_dict.placeholder(int)  # None: the whole train split
  config.train_examples = train_examples

  # Model.
  config.width = 1.0  # channel multiplier
  config.compute_dtype = "float32"  # params stay float32

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

  # Method knobs (see README, "Methods").
  config.lw = ml_collections.ConfigDict(dict(
      rescale=True,             # rescale kept units to their norms at initialization
      normalize=True,           # standardize the output of the top kept unit
      reset_batch_stats=True,   # reinitialize running BN statistics of the reset units
      rescale_zero_init=False,  # also rescale zero-initialized leaves (sets them to zero)
      calibration_batches=4,    # training batches for the standardization statistics
  ))
  config.baseline_long = ml_collections.ConfigDict(dict(compare_with="lw"))

  # Bookkeeping.
  config.log_every_steps = 50
  config.checkpoint_every_steps = 0  # 0: only at stage ends (checkpointing: see README)
  return config


def get_sweep(arg: str | None = None) -> list[dict]:
  """The runs of `launch.sweep` for this config: the baseline and LW, one seed."""
  del arg
  return [dict(method="baseline"), dict(method="lw")]
