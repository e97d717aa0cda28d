"""`validate(config)`: one place that knows every field; a bad one is a one-line ConfigError
naming it (and nothing runs)."""

import pytest

from configs import digits as digits_config
from reinit import validation


def _config(**overrides):
  config = digits_config.get_config("method=lw")
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def test_the_default_configs_are_valid():
  for method in ("baseline", "lw", "dsd", "ke", "llf"):
    validation.validate(digits_config.get_config(f"method={method}"))


@pytest.mark.parametrize("field,value", [
    ("model", "resnet9"), ("method", "lw2"), ("compute_dtype", "float16"),
    ("augment", "mixup"), ("train_examples", 0), ("train_examples", -2),
    ("batch_size", 0), ("eval_batch_size", -4), ("epochs_per_stage", 0),
    ("log_every_steps", 0), ("num_stages", 0), ("learning_rate", 0.0), ("width", -1.0),
    ("momentum", 1.0), ("weight_decay", -1e-4), ("warmup_epochs", -1.0),
    ("label_smoothing", 1.0), ("checkpoint_every_steps", -5), ("reset_optimizer", "zero"),
    ("num_devices", 0), ("batch_size", 33), ("compare_with", "restarts"),
    ("lw.earlier_standardizations", "both"), ("lw.calibration_batches", 0),
    ("ke.split_granularity", "layer"), ("ke.split_rate", 1.5), ("rand.fraction", -0.1),
    ("dsd.sparsity", 2.0), ("sp.shrink", -1.0), ("dsd.lr_factor", 0.0),
])
def test_a_bad_field_is_named_in_one_line(field, value):
  with pytest.raises(validation.ConfigError) as info:
    validation.validate(_config(**{field: value}))
  message = str(info.value)
  assert message.startswith(f"{field}=") and "accepted" in message and "\n" not in message


def test_fold_is_refused_for_models_it_is_not_defined_for():
  validation.validate(_config(**{"lw.earlier_standardizations": "fold"}))  # simple_cnn
  with pytest.raises(validation.ConfigError, match="earlier_standardizations='fold'.*resnet18"):
    validation.validate(_config(model="resnet18", **{"lw.earlier_standardizations": "fold"}))
