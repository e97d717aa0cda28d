"""Model registry: `get_model(name, num_classes=..., **kwargs)`.

Every model's top-level submodules are its LW units in bottom-up order (head last), and every
unit but the head ends with a `Standardize` (see `standardize.py`).
"""

import jax.numpy as jnp

from reinit.models.conv import CONV_CHOICES
from reinit.models.conv import CONVOLUTIONS
from reinit.models.conv import resolve_conv
from reinit.models.resnet import ResNet18, ResNet50
from reinit.models.simple_cnn import SimpleCNN
from reinit.models.standardize import MOMENTS_COLLECTION, NORM_COLLECTION, Standardize
from reinit.models.vgg import VGG16

MODELS = {
    "simple_cnn": SimpleCNN,
    "vgg16": VGG16,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
}


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def from_config(config, num_classes: int, runs: int = 1):
  """The linen module of a run config (`model`, `width`, `compute_dtype`, `conv`), `num_classes`
  outputs, for a program of `runs` runs (`conv='auto'` resolves by it: `resolve_conv`).
  Configs written before `conv` existed get XLA's convolution."""
  return get_model(config.model, num_classes=num_classes, width=config.width,
                   dtype=COMPUTE_DTYPES[config.compute_dtype],
                   conv=resolve_conv(config.get("conv", "xla"), runs))


def get_model(name: str, *, num_classes: int, **kwargs):
  """Returns the linen module registered as `name`; ValueError names the accepted ones."""
  if name not in MODELS:
    raise ValueError(f"model={name!r} is unknown; accepted: {', '.join(sorted(MODELS))}")
  return MODELS[name](num_classes=num_classes, **kwargs)
