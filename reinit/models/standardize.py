"""The frozen per-channel standardization that LW switches on at a unit boundary.

Every unit of our models (except the head) ends in a `Standardize`. Its variables live in
their own collection, `norm`, so they are neither trained nor touched by BatchNorm updates:

  norm/<unit>/Standardize_0/active  ()    float32, 0 (identity) or 1 (on)
  norm/<unit>/Standardize_0/mean    (C,)  float32, per-channel mean of the unit's output
  norm/<unit>/Standardize_0/var     (C,)  float32, per-channel variance of the unit's output

Switching a standardization on or off changes those values, never the shapes, so a stage switch
never recompiles the train step. While a forward pass runs with the `moments` collection
mutable, each `Standardize` also records the per-channel first and second moments of its input
(used to calibrate `mean`/`var` from training batches right after a reset).
"""

import flax.linen as nn
import jax.numpy as jnp

NORM_COLLECTION = "norm"
MOMENTS_COLLECTION = "moments"


class Standardize(nn.Module):
  """y = x when inactive; y = (x - mean) / sqrt(var + eps) when active. Shapes: (..., C)."""

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    active = self.variable(NORM_COLLECTION, "active", lambda: jnp.zeros((), jnp.float32))
    mean = self.variable(NORM_COLLECTION, "mean", lambda: jnp.zeros((channels,), jnp.float32))
    var = self.variable(NORM_COLLECTION, "var", lambda: jnp.ones((channels,), jnp.float32))
    # `init` makes every collection mutable; moments are only wanted from explicit calibration.
    if self.is_mutable_collection(MOMENTS_COLLECTION) and not self.is_initializing():
      reduce_axes = tuple(range(x.ndim - 1))
      x32 = x.astype(jnp.float32)
      self.sow(MOMENTS_COLLECTION, "first", jnp.mean(x32, axis=reduce_axes))
      self.sow(MOMENTS_COLLECTION, "second", jnp.mean(jnp.square(x32), axis=reduce_axes))
    standardized = (x - mean.value.astype(x.dtype)) * jnp.reciprocal(
        jnp.sqrt(var.value + self.epsilon)).astype(x.dtype)
    # A blend rather than a Python branch: `active` is data, so on/off is one program.
    return x + active.value.astype(x.dtype) * (standardized - x)
