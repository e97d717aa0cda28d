"""The methods LW is compared with, as stage switches: head, LLF, KE, random, S&P, DSD.

Each `*_switch(...)` factory returns a switch `(k, variables, fresh, memory, rng) -> Switched`
(`reinit.methods.base`); DSD also wraps the optimizer (`hold_at_zero`).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from reinit import transforms
from reinit.methods.base import flat, reset_mask, Switched, unflat

PyTree = Any


def layers_switch(layers: Sequence[str], *, reset_batch_stats: bool = True):
  """A switch that reinitializes `layers` every stage (head: the head; llf: units[k0:])."""
  def switch(k, variables, fresh, memory, rng):
    del k, rng
    mask = reset_mask(variables, layers, reset_batch_stats)
    return Switched(transforms.reinitialize(variables, fresh, mask), memory, mask["params"])
  return switch


def _complement_in_mask(mask: PyTree) -> PyTree:
  """Array leaves negated, Python-bool leaves False: the unselected part of what was drawn."""
  return jax.tree.map(lambda m: False if isinstance(m, bool) else ~m, mask)


def kels_mask(params: PyTree, *, split_rate: float, units: Sequence[str]) -> PyTree:
  """KE's kernel-level fit hypothesis (KELS, Taha et al. 2021): a slim network of leading channels.

  Every conv kernel (H, W, C_in, C_out) keeps its leading ceil(r·C_in) x ceil(r·C_out) block
  (the first layer, in units[0], all of its input channels: the image's); the head's kernel
  (C_in, classes) its leading ceil(r·C_in) rows and every class, its bias every class; other
  dense layers the leading block like convs, their biases the leading ceil(r·C_out) entries.
  Because every layer keeps the *leading* channels, the kept channels line up from layer to
  layer and across residual additions: the fit hypothesis is a self-contained network of
  width r. BatchNorm and every other leaf are left alone (True: kept).

  Args:
    params: a bare `params` tree; its top-level names are the units.
    split_rate: r in (0, 1].
    units: `layer_order(model)`, head last.

  Returns:
    A mask over `params`: numpy bool arrays for kernels and biases, True elsewhere.
  """
  first, head = units[0], units[-1]

  def slim(channels: int) -> int:
    return int(np.ceil(split_rate * channels))

  def leading(shape, counts):
    mask = np.zeros(shape, np.bool_)
    mask[tuple(slice(None, c) for c in counts)] = True
    return mask

  out = {}
  leaves = flat(params)
  for path, leaf in leaves.items():
    module, name, unit = path[:-1], path[-1], path[0]
    has_kernel = (*module, "kernel") in leaves
    if name == "kernel" and leaf.ndim >= 2:
      c_in, c_out = leaf.shape[-2:]
      rows = c_in if unit == first and leaf.ndim == 4 else slim(c_in)
      cols = c_out if unit == head else slim(c_out)
      out[path] = leading(leaf.shape, (*leaf.shape[:-2], rows, cols))
    elif name == "bias" and has_kernel:
      out[path] = leading(leaf.shape, (leaf.shape[-1] if unit == head else slim(leaf.shape[-1]),))
    else:
      out[path] = True
  return unflat(out)


def ke_fit_mask(key: jax.Array, params: PyTree, *, split_rate: float, granularity: str,
                units: Sequence[str]) -> PyTree:
  """KE's fit hypothesis, True = kept across generations: `weight` (WELS) draws `split_rate` of
  every kernel's entries once with `key`; `filter` (KELS) is `kels_mask`, the same for every key."""
  if granularity == "filter":
    return kels_mask(params, split_rate=split_rate, units=units)
  return transforms.random_mask(key, params, fraction=split_rate, granularity="weight")


def ke_switch(*, split_rate: float, granularity: str, units: Sequence[str]):
  """Knowledge Evolution: reinitialize the reset hypothesis (complement of the fixed fit mask)."""
  def switch(k, variables, fresh, memory, rng):
    del k, rng
    fit = ke_fit_mask(jax.random.wrap_key_data(memory["split_key"]), variables["params"],
                      split_rate=split_rate, granularity=granularity, units=units)
    reset = _complement_in_mask(fit)
    params = transforms.reinitialize(variables["params"], fresh["params"], reset)
    return Switched({**variables, "params": params}, memory, reset)
  return switch


def rand_switch(*, fraction: float):
  """Random-subset reinitialization: a new `fraction` of each kernel's entries every stage."""
  def switch(k, variables, fresh, memory, rng):
    del k
    reset = transforms.random_mask(rng, variables["params"], fraction=fraction)
    params = transforms.reinitialize(variables["params"], fresh["params"], reset)
    return Switched({**variables, "params": params}, memory, reset)
  return switch


def sp_switch(*, shrink: float, perturb: float, reset_batch_stats: bool = False):
  """Shrink-and-perturb: every param becomes `shrink * p + perturb * fresh`; with
  `reset_batch_stats`, the running BatchNorm statistics are the fresh init's, as in Ash &
  Adams' code (its blended network is the fresh one, whose buffers were never trained; it
  trains each round to 99% training accuracy, long enough for them to be re-estimated)."""
  def switch(k, variables, fresh, memory, rng):
    del k, rng
    params = transforms.shrink_perturb(variables["params"], fresh["params"], shrink=shrink,
                                       perturb=perturb)
    switched = {**variables, "params": params}
    if reset_batch_stats and "batch_stats" in variables:
      stats = variables["batch_stats"]
      switched["batch_stats"] = transforms.reinitialize(stats, fresh["batch_stats"],
                                                        jax.tree.map(lambda _: True, stats))
    return Switched(switched, memory, jax.tree.map(lambda _: True, params))
  return switch


def dsd_begin(variables, rng):
  """DSD starts dense: every param kept (`hold_at_zero` reads `keep`)."""
  del rng
  return {"keep": jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bool_), variables["params"])}


def dsd_switch(*, sparsity: float):
  """Dense-Sparse-Dense: stage 1 prunes, stage 2 releases the pruned weights (from zero).

  Written for a traced `k` (both branches computed, one selected), so one compiled switch
  serves both stages.
  """
  def switch(k, variables, fresh, memory, rng):
    del fresh, rng
    params = variables["params"]
    prune = jnp.asarray(k) == 1
    pruned = transforms.magnitude_mask(params, sparsity=sparsity)
    pruned = jax.tree.map(lambda p, m: jnp.zeros(p.shape, jnp.bool_) if isinstance(m, bool)
                          else m & prune, params, pruned)
    keep = jax.tree.map(lambda m: ~m, pruned)
    params = jax.tree.map(lambda p, kept: jnp.where(kept, p, jnp.zeros_like(p)), params, keep)
    return Switched({**variables, "params": params}, {"keep": keep}, pruned)
  return switch


def _where_kept(tree: PyTree, keep: PyTree) -> PyTree:
  return jax.tree.map(lambda x, k: jnp.where(k, x, jnp.zeros_like(x)), tree, keep)


def hold_at_zero(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """DSD's sparse training as an optimizer wrapper (as jaxpruner wraps optimizers).

  Where `memory['keep']` is False, the gradients `inner` sees are zero: there a weight that
  `dsd_switch` pruned to zero, with a fresh (or masked-reset) optimizer state, gets a zero
  update from SGD with momentum and decoupled weight decay and stays exactly zero (tested).
  An inner optimizer that moves a weight with a zero gradient and zero state would need its
  updates masked too; ours does not, and masking them would change the rounding of every kept
  weight's update (XLA fuses the update into the parameter addition). `update` takes the
  method's memory as the keyword `memory`.
  """
  inner = optax.with_extra_args_support(inner)

  def update(updates, state, params=None, *, memory, **extra_args):
    return inner.update(_where_kept(updates, memory["keep"]), state, params, **extra_args)
  return optax.GradientTransformationExtraArgs(inner.init, update)



def ke_begin(variables, rng):
  """KE's memory: the key of its fit mask, drawn once (raw key data: memory is checkpointed as
  plain arrays)."""
  del variables
  return {"split_key": jax.random.key_data(rng)}
