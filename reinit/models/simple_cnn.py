"""SimpleCNN: 3 stages of [conv3x3-BN-ReLU x2, max-pool 2], widths 32/64/128, GAP, dense head.

Its top-level submodules are its LW units, bottom-up: `block0` ... `block5` (one conv each; the
second block of a stage ends with the 2x2 max-pool) and `head`. Each block ends with a
`Standardize` (inactive until LW switches it on).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from reinit.models.conv import conv_layer
from reinit.models.standardize import Standardize


def max_pool_2x2(x):
  """2x2 max-pool, stride 2, 'SAME' padding. (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C).

  The values of `nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")`, as a max of four
  strided views: its gradient is then a comparison mask, where reduce-window's is a
  select-and-scatter that XLA:CPU lowers to index arithmetic (SimpleCNN's train step on 2
  cores: 440 -> 510 images/s). Gradients are equal too, except that equal maxima in a window
  share theirs rather than giving it all to the first (after a ReLU, ties at 0 get none).
  """
  odd = ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0))
  if odd[1][1] or odd[2][1]:
    x = jnp.pad(x, odd, constant_values=-jnp.inf)
  return jnp.maximum(jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
                     jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))


class ConvBlock(nn.Module):
  """conv3x3 -> BN -> ReLU [-> max-pool 2x2] -> Standardize.

  (N, H, W, C) -> (N, H', W', features).
  """

  features: int
  pool: bool
  dtype: Any = jnp.float32
  conv: str = "xla"  # a key of `conv.CONVOLUTIONS`

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv_layer(self.conv, self.features, (3, 3), padding="SAME", use_bias=False,
                   dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
    x = nn.relu(x)
    if self.pool:
      x = max_pool_2x2(x)
    return Standardize()(x)


class SimpleCNN(nn.Module):
  """(N, H, W, C) images -> (N, num_classes) float32 logits."""

  num_classes: int
  widths: Sequence[int] = (32, 64, 128)
  width: float = 1.0  # multiplier on `widths`, for quick runs
  dtype: Any = jnp.float32
  conv: str = "xla"  # a key of `conv.CONVOLUTIONS`

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    index = 0
    for stage_width in self.widths:
      features = max(1, int(round(stage_width * self.width)))
      for pool in (False, True):
        x = ConvBlock(features, pool, dtype=self.dtype, conv=self.conv,
                      name=f"block{index}")(x, train)
        index += 1
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return logits.astype(jnp.float32)
