"""VGG16 with BatchNorm: 13 conv3x3-BN-ReLU layers in 5 stages, a 2x2 max-pool after each stage.

Stage widths are 64,64 | 128,128 | 256,256,256 | 512,512,512 | 512,512,512. Its top-level
submodules are its LW units, bottom-up: `block0` ... `block12` (one conv each; the last conv of a
stage ends with the 2x2 max-pool) and `head`. Each block ends with a `Standardize` (inactive
until LW switches it on).

Classifier head (`classifier` field):
  'gap'  global average pool + one Dense, as in the common CIFAR variants of VGG. On 32 px
         inputs the last feature map is 1x1, so this is the same function as their
         flatten + Dense(512 -> classes); it keeps the model at ~14.7M parameters instead of
         the ~120M of the original classifier, which would dwarf small training sets.
  'fc'   the original ImageNet classifier: average-pool to 7x7 (adaptively, as torchvision
         does), flatten, Dense 4096 - ReLU - Dropout - Dense 4096 - ReLU - Dropout - Dense.
         The three Dense layers form the single `head` unit. Dropout defaults to 0 (the
         original uses 0.5) so that a train step without a 'dropout' rng works for every model.
  'auto' (default) 'gap' for images <= 64 px on their longer side, 'fc' above.

Convs have no bias (BatchNorm follows, so it would be redundant), which leaves 4,224 fewer
parameters than the torchvision/CIFAR ports that keep it.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from reinit.models.simple_cnn import ConvBlock

# (width, number of conv layers) per stage; each stage ends with a 2x2 max-pool.
VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))

# Largest image side (px) that counts as "small" (CIFAR-style) for the 'auto' choices.
SMALL_IMAGE_MAX_SIDE = 64


def _adaptive_avg_pool_matrix(size: int, out_size: int) -> np.ndarray:
  """(out_size, size) averaging weights: bin i covers [floor(i*size/out), ceil((i+1)*size/out)).

  These are torchvision's `AdaptiveAvgPool2d` bins, so a 7x7 map is left unchanged and smaller
  maps are repeated, which lets the 'fc' head take any image size.
  """
  weights = np.zeros((out_size, size), np.float32)
  for i in range(out_size):
    start = (i * size) // out_size
    stop = -((-(i + 1) * size) // out_size)  # ceil
    weights[i, start:stop] = 1.0 / (stop - start)
  return weights


def adaptive_avg_pool(x, out_hw=(7, 7)):
  """(N, H, W, C) -> (N, out_h, out_w, C) average pooling into a fixed grid of bins."""
  rows = jnp.asarray(_adaptive_avg_pool_matrix(x.shape[1], out_hw[0]), x.dtype)
  cols = jnp.asarray(_adaptive_avg_pool_matrix(x.shape[2], out_hw[1]), x.dtype)
  return jnp.einsum("ih,jw,nhwc->nijc", rows, cols, x)


class FCHead(nn.Module):
  """The original VGG classifier. (N, H, W, C) features -> (N, num_classes) logits.

  Dropout needs a 'dropout' rng in train mode when `dropout_rate > 0`.
  """

  num_classes: int
  hidden: int = 4096
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = adaptive_avg_pool(x, (7, 7))
    x = x.reshape((x.shape[0], -1))
    for _ in range(2):
      x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class VGG16(nn.Module):
  """(N, H, W, C) images -> (N, num_classes) float32 logits."""

  num_classes: int
  width: float = 1.0  # multiplier on the stage widths, for quick runs
  classifier: str = "auto"  # 'auto' | 'gap' | 'fc', see the module docstring
  dropout_rate: float = 0.0  # 'fc' classifier only; the original's 0.5 needs a 'dropout' rng
  dtype: Any = jnp.float32
  conv: str = "xla"  # a key of `conv.CONVOLUTIONS`

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.classifier not in ("auto", "gap", "fc"):
      raise ValueError(f"classifier={self.classifier!r}; accepted: 'auto', 'gap', 'fc'")
    classifier = self.classifier
    if classifier == "auto":
      classifier = "gap" if max(x.shape[1:3]) <= SMALL_IMAGE_MAX_SIDE else "fc"
    x = x.astype(self.dtype)
    index = 0
    for stage_width, depth in VGG16_STAGES:
      features = max(1, int(round(stage_width * self.width)))
      for layer in range(depth):
        x = ConvBlock(features, pool=layer == depth - 1, dtype=self.dtype, conv=self.conv,
                      name=f"block{index}")(x, train)
        index += 1
    if classifier == "gap":
      x = jnp.mean(x, axis=(1, 2))
      logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    else:
      hidden = max(1, int(round(4096 * self.width)))
      logits = FCHead(self.num_classes, hidden, self.dropout_rate, dtype=self.dtype,
                      name="head")(x, train)
    return logits.astype(jnp.float32)
