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
  sh, sw = window_strides
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
  (top, bottom), (left, right) = padding
  padded = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h = (padded.shape[1] - kh) // sh + 1
  out_w = (padded.shape[2] - kw) // sw + 1
  # Shifted strided slices, not `lax.conv_general_dilated_patches` (itself a convolution with
  # kh·kw·C_in outputs: ~kh·kw times the FLOPs of the convolution it replaces). Features are
  # ordered (kh, kw, C_in), as the HWIO kernel's rows.
  patches = jnp.concatenate(
      [padded[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]
       for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.einsum("nhwk,ko->nhwo", patches, rhs.reshape(kh * kw * c_in, c_out),
                    precision=precision, preferred_element_type=preferred_element_type)


CONVOLUTIONS = {"xla": None, "im2col": im2col_conv}  # None: flax's default, XLA's convolution
CONV_CHOICES = ("auto", *CONVOLUTIONS)  # the config field's values


def resolve_conv(choice: str, runs: int = 1) -> str:
  """The convolution of config value `choice` in a program of `runs` runs: 'auto' is XLA's for
  one run and im2col for a group (vmapped, XLA's convolutions become grouped ones, which
  XLA:CPU and cuDNN run several times slower than the batched matrix products of im2col:
  README, "Groups of runs"); 'xla' and 'im2col' are themselves."""
  if choice not in CONV_CHOICES:
    raise ValueError(f"conv={choice!r} is unknown; accepted: {', '.join(CONV_CHOICES)}")
  if choice == "auto":
    return "xla" if runs == 1 else "im2col"
  return choice


def conv_layer(impl: str, *args, **kwargs) -> nn.Conv:
  """`nn.Conv(*args, **kwargs)` computed by the convolution `impl` (a key of CONVOLUTIONS)."""
  if impl not in CONVOLUTIONS:
    raise ValueError(f"conv={impl!r} is unknown; accepted: {', '.join(CONVOLUTIONS)}")
  return nn.Conv(*args, conv_general_dilated=CONVOLUTIONS[impl], **kwargs)
