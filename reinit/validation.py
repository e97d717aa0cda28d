"""`validate(config)`: every field of a run config checked in one place, before anything runs.

A bad value raises `ConfigError` with one line naming the field and the accepted values. What
can only be checked against the data (the dataset's existence, split sizes, image sizes) is
checked when `reinit.data.Data` is built; what needs the model's units (`llf.reset_from` by
name) when the plan is built.
"""

import numbers

import jax

from reinit import methods
from reinit import models
from reinit.data.registry import AUGMENTATIONS

OPTIMIZER_POLICIES = ("fresh", "masked")
KE_GRANULARITIES = ("weight", "filter")


class ConfigError(ValueError):
  """A user error in the config, the workdir or the data they name; a one-line message."""


def _choice(field: str, value, accepted) -> None:
  if value not in accepted:
    raise ConfigError(f"{field}={value!r} is unknown; accepted: {', '.join(accepted)}")


def _positive_int(field: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ConfigError(f"{field}={value!r} is invalid; accepted: a positive integer")


def _number(field: str, value, low: float, high: float, *, low_open: bool = False,
            high_open: bool = False) -> None:
  """`value` a real number in [low, high] (open ends as asked)."""
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  ok = ok and (value > low if low_open else value >= low)
  ok = ok and (value < high if high_open else value <= high)
  if not ok:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ConfigError(f"{field}={value!r} is invalid; accepted: a number in {interval}")


def num_devices(config) -> int:
  """Devices the run uses: `config.num_devices`, or all when -1."""
  requested = config.get("num_devices", -1)
  return jax.device_count() if requested == -1 else requested


def _check_data_fields(config) -> None:
  _choice("augment", config.augment, AUGMENTATIONS)
  examples = config.train_examples
  if examples is not None and examples != -1 and (not isinstance(examples, int) or examples < 1):
    raise ConfigError(f"train_examples={examples!r} is invalid; accepted: a positive number of "
                      "examples, or -1 (or unset) for the whole train split")


def _check_optimization(config) -> None:
  for field in ("batch_size", "eval_batch_size", "epochs_per_stage", "log_every_steps"):
    _positive_int(field, config[field])
  if config.num_stages != -1:
    _positive_int("num_stages", config.num_stages)
  _number("learning_rate", config.learning_rate, 0, float("inf"), low_open=True)
  _number("width", config.width, 0, float("inf"), low_open=True)
  _number("momentum", config.momentum, 0, 1, high_open=True)
  _number("weight_decay", config.weight_decay, 0, float("inf"))
  _number("warmup_epochs", config.warmup_epochs, 0, float("inf"))
  _number("label_smoothing", config.label_smoothing, 0, 1, high_open=True)
  if config.checkpoint_every_steps != 0:
    _positive_int("checkpoint_every_steps", config.checkpoint_every_steps)
  _choice("reset_optimizer", config.reset_optimizer, OPTIMIZER_POLICIES)


def _check_devices(config) -> None:
  requested = config.get("num_devices", -1)
  if requested != -1 and not (isinstance(requested, int) and 1 <= requested <= jax.device_count()):
    raise ConfigError(f"num_devices={requested!r} is invalid; accepted: -1 (all) or 1.."
                      f"{jax.device_count()}")
  devices = num_devices(config)
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % devices:
      raise ConfigError(f"{field}={config[field]} is invalid; accepted: a multiple of the "
                        f"number of devices ({devices})")


def _check_method_knobs(config) -> None:
  _choice("compare_with", config.compare_with, methods.COMPARABLE)
  policy = config.lw.earlier_standardizations
  _choice("lw.earlier_standardizations", policy, methods.STANDARDIZATION_POLICIES)
  if policy == "fold" and config.model not in methods.FOLDABLE_MODELS:
    raise ConfigError(f"lw.earlier_standardizations='fold' is not defined for "
                      f"model={config.model!r}; accepted: off or on, or fold with a model in "
                      f"{', '.join(methods.FOLDABLE_MODELS)}")
  _positive_int("lw.calibration_batches", config.lw.calibration_batches)
  _choice("ke.split_granularity", config.ke.split_granularity, KE_GRANULARITIES)
  for field in ("ke.split_rate", "rand.fraction", "dsd.sparsity"):
    section, knob = field.split(".")
    _number(field, config[section][knob], 0, 1)
  _number("sp.shrink", config.sp.shrink, 0, float("inf"))
  _number("sp.perturb", config.sp.perturb, 0, float("inf"))
  _number("dsd.lr_factor", config.dsd.lr_factor, 0, float("inf"), low_open=True)


def validate(config) -> None:
  """Raises ConfigError (one line naming the field and the accepted values) on a bad field."""
  _choice("model", config.model, sorted(models.MODELS))
  _choice("method", config.method, methods.METHODS)
  _choice("compute_dtype", config.compute_dtype, tuple(models.COMPUTE_DTYPES))
  _choice("conv", config.get("conv", "xla"), models.CONV_CHOICES)
  _check_data_fields(config)
  _check_optimization(config)
  _check_devices(config)
  _check_method_knobs(config)
