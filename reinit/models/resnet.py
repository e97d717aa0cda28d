"""ResNet18 (BasicBlock, [2, 2, 2, 2]) and ResNet50 (v1.5 Bottleneck, [3, 4, 6, 3]).

Stage widths 64/128/256/512 (a Bottleneck outputs 4x its width). Their top-level submodules are
their LW units, bottom-up:

  stem                      conv-BN-ReLU[-max-pool]
  block0 ... block7         ResNet18: the 8 BasicBlocks, stage by stage
  block0 ... block15        ResNet50: the 16 Bottlenecks, stage by stage
  head                      Dense on the globally average-pooled features

Every unit but the head ends with a `Standardize` applied after the block's final ReLU (inactive
until LW switches it on).

Stem (`stem` field): 'cifar' is conv3x3 stride 1 - BN - ReLU with no max-pool, the usual choice
for small images, whose 32x32 map would otherwise shrink to 8x8 before the first block;
'imagenet' is the standard conv7x7 stride 2 - BN - ReLU - max-pool 3x3 stride 2; 'auto' (default)
picks 'cifar' for images <= 64 px on their longer side and 'imagenet' above, from the input shape.

The first block of stages 2-4 downsamples by 2; a block whose input and output shapes differ adds
a projection shortcut (1x1 conv with the block's stride + BN). Convs use explicit PyTorch-style
padding so that the strided 3x3 conv and the strided 1x1 shortcut sample the same pixels.
At width 1, 10 classes, 32 px: ResNet18 has 11,173,962 params, ResNet50 23,520,842.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from reinit.models.conv import conv_layer
from reinit.models.standardize import Standardize

# Largest image side (px) that gets the CIFAR-style stem under stem='auto'.
SMALL_IMAGE_MAX_SIDE = 64


def _pad(kernel: int):
  """Symmetric padding of a k x k conv or pool (PyTorch `padding=k // 2`)."""
  return ((kernel // 2, kernel // 2),) * 2


class Stem(nn.Module):
  """(N, H, W, C) -> (N, H, W, features) ['cifar'] or (N, H/4, W/4, features) ['imagenet']."""

  features: int
  imagenet: bool
  dtype: Any = jnp.float32
  conv: str = "xla"  # a key of `conv.CONVOLUTIONS`

  @nn.compact
  def __call__(self, x, train: bool):
    if self.imagenet:
      x = conv_layer(self.conv, self.features, (7, 7), strides=(2, 2), padding=_pad(7),
                     use_bias=False, dtype=self.dtype, name="conv")(x)
    else:
      x = conv_layer(self.conv, self.features, (3, 3), padding=_pad(3), use_bias=False,
                     dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype, name="bn")(x)
    x = nn.relu(x)
    if self.imagenet:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
    return Standardize()(x)


class BasicBlock(nn.Module):
  """conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, ReLU, Standardize.

  (N, H, W, C) -> (N, H/strides, W/strides, features).
  """

  features: int
  strides: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  conv: str = "xla"  # a key of `conv.CONVOLUTIONS`

  expansion = 1  # output channels / `features` (a class constant, not a field)

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name, **kw: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                         dtype=self.dtype, name=name, **kw)
    y = conv_layer(self.conv, self.features, (3, 3), strides=(self.strides,) * 2,
                   padding=_pad(3), use_bias=False, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = conv_layer(self.conv, self.features, (3, 3), padding=_pad(3), use_bias=False,
                   dtype=self.dtype, name="conv2")(y)
    # A zero scale makes the block start as the identity (Goyal et al., 2017).
    y = bn("bn2", scale_init=nn.initializers.zeros if self.zero_init_residual
           else nn.initializers.ones)(y)
    shortcut = _shortcut(x, self.features * self.expansion, self.strides, bn, self.dtype,
                         self.conv)
    return Standardize()(nn.relu(y + shortcut))


class Bottleneck(nn.Module):
  """v1.5 bottleneck: conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN + shortcut, ReLU,
  Standardize. The stride sits on the 3x3 conv (v1.5, as in torchvision), not the first 1x1.

  (N, H, W, C) -> (N, H/strides, W/strides, 4 * features).
  """

  features: int
  strides: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  conv: str = "xla"  # a key of `conv.CONVOLUTIONS`

  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name, **kw: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                         dtype=self.dtype, name=name, **kw)
    y = conv_layer(self.conv, self.features, (1, 1), use_bias=False, dtype=self.dtype,
                   name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = conv_layer(self.conv, self.features, (3, 3), strides=(self.strides,) * 2,
                   padding=_pad(3), use_bias=False, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(bn("bn2")(y))
    y = conv_layer(self.conv, self.features * self.expansion, (1, 1), use_bias=False,
                   dtype=self.dtype, name="conv3")(y)
    y = bn("bn3", scale_init=nn.initializers.zeros if self.zero_init_residual
           else nn.initializers.ones)(y)
    shortcut = _shortcut(x, self.features * self.expansion, self.strides, bn, self.dtype,
                         self.conv)
    return Standardize()(nn.relu(y + shortcut))


def _shortcut(x, out_features: int, strides: int, bn, dtype, conv: str):
  """Identity when the shape is kept, else a 1x1 conv (stride `strides`) + BN projection.

  Called inside the block's compact `__call__`, so its modules belong to that block.
  """
  if strides == 1 and x.shape[-1] == out_features:
    return x
  x = conv_layer(conv, out_features, (1, 1), strides=(strides, strides), use_bias=False,
                 dtype=dtype, name="shortcut_conv")(x)
  return bn("shortcut_bn")(x)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """(N, H, W, C) images -> (N, num_classes) float32 logits. See `ResNet18`, `ResNet50`."""

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"  # 'basic' | 'bottleneck'
  widths: Sequence[int] = (64, 128, 256, 512)
  width: float = 1.0  # multiplier on `widths` (and the stem), for quick runs
  stem: str = "auto"  # 'auto' | 'cifar' | 'imagenet', see the module docstring
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  conv: str = "xla"  # a key of `conv.CONVOLUTIONS`

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.stem not in ("auto", "cifar", "imagenet"):
      raise ValueError(f"stem={self.stem!r}; accepted: 'auto', 'cifar', 'imagenet'")
    if self.block not in BLOCKS:
      raise ValueError(f"block={self.block!r}; accepted: {', '.join(sorted(BLOCKS))}")
    imagenet = (self.stem == "imagenet"
                or (self.stem == "auto" and max(x.shape[1:3]) > SMALL_IMAGE_MAX_SIDE))
    scaled = lambda w: max(1, int(round(w * self.width)))
    x = x.astype(self.dtype)
    x = Stem(scaled(self.widths[0]), imagenet, dtype=self.dtype, conv=self.conv,
             name="stem")(x, train)
    block_cls = BLOCKS[self.block]
    index = 0
    for stage, (stage_width, size) in enumerate(zip(self.widths, self.stage_sizes)):
      for i in range(size):
        strides = 2 if stage > 0 and i == 0 else 1
        x = block_cls(scaled(stage_width), strides, self.zero_init_residual, dtype=self.dtype,
                      conv=self.conv, name=f"block{index}")(x, train)
        index += 1
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return logits.astype(jnp.float32)


class ResNet18(ResNet):
  """ResNet18: BasicBlocks [2, 2, 2, 2]; LW units stem, block0..block7, head."""

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"


class ResNet50(ResNet):
  """ResNet50 v1.5: Bottlenecks [3, 4, 6, 3]; LW units stem, block0..block15, head."""

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
