"""Convolutions the models can be built with (`conv` field): XLA's, or image patches times the
kernel (`im2col`).

`im2col_conv` computes what `lax.conv_general_dilated` does for NHWC inputs and HWIO kernels as
a matrix product of the image patches (N, H', W', kh·kw·C_in) with the kernel reshaped to
(C_in·kh·kw, C_out). Its use is speed, not new numbers (they agree to float rounding):
- under `jax.vmap` over a group of runs with their own kernels, XLA turns a convolution into a
  grouped convolution (slow in cuDNN), but a matrix product into one batched matrix product;
- the kernel's gradient becomes a matrix product too, where XLA's CPU backend runs the
  weight-gradient convolution at a fraction of the forward's speed.
"""

import flax.linen as nn
from jax import lax
import jax.numpy as jnp


def im2col_conv(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None,
                preferred_element_type=None):
  """`lax.conv_general_dilated`'s signature, as `nn.Conv(conv_general_dilated=...)` calls it.

  lhs (N, H, W, C_in), rhs (kh, kw, C_in, C_out) -> (N, H', W', C_out). No dilation, no
  feature groups (ValueError).
  """
  del dimension_numbers  # flax's NHWC / HWIO / NHWC, the only layout handled here
  dilated = any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  if dilated or feature_group_count != 1:
    raise ValueError("im2col_conv handles neither dilation nor feature groups; accepted: "
                     "conv='xla' for those")
  kh, kw, c_in, c_out = rhs.shape
  # HIGHEST: the patches are copies of the inputs (a 0/1 kernel); TF32 would round them.
  patches = lax.conv_general_dilated_patches(
      lhs, (kh, kw), window_strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST)
  # The patches' features are ordered (C_in, kh, kw): the kernel's rows must be too.
  kernel = jnp.transpose(rhs, (2, 0, 1, 3)).reshape(c_in * kh * kw, c_out)
  return jnp.einsum("nhwk,ko->nhwo", patches, kernel, precision=precision,
                    preferred_element_type=preferred_element_type)


CONVOLUTIONS = {"xla": None, "im2col": im2col_conv}  # None: flax's default, XLA's convolution


def conv_layer(impl: str, *args, **kwargs) -> nn.Conv:
  """`nn.Conv(*args, **kwargs)` computed by the convolution `impl` (a key of CONVOLUTIONS)."""
  if impl not in CONVOLUTIONS:
    raise ValueError(f"conv={impl!r} is unknown; accepted: {', '.join(CONVOLUTIONS)}")
  return nn.Conv(*args, conv_general_dilated=CONVOLUTIONS[impl], **kwargs)
