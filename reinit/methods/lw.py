"""Bottom-up layerwise reinitialization (LW): the stage switch, its rescaling and standardization.

Before stage k: keep units[:k] rescaled to their norms at initialization, reinitialize units[k:]
(params and running statistics), and switch on a frozen per-channel standardization at the
output of units[k-1] with statistics from a few training batches (`calibrate_standardization`,
the plan's calibration hook).
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp

from reinit import transforms
from reinit.methods.base import flat, restrict, Switched, unit_mask, unflat
from reinit.models.standardize import MOMENTS_COLLECTION, NORM_COLLECTION, Standardize
from reinit import tree as tree_lib

PyTree = Any

_ZERO_NORM = 1e-6  # init norms at or below it mark zero-initialized leaves (biases)


def init_norms(variables: PyTree) -> PyTree:
  """Frobenius norm (float32 scalar) of every `params` leaf: LW's rescaling targets."""
  return jax.tree.map(lambda p: jnp.linalg.norm(p.astype(jnp.float32).ravel()),
                      variables["params"])


def deactivate_standardizations(variables: PyTree) -> PyTree:
  """Sets every `norm/.../active` flag to 0 (identity), values only."""
  def off(path, leaf):
    return jnp.zeros_like(leaf) if path.endswith("/active") else leaf
  return {**variables, NORM_COLLECTION: tree_lib.map_with_path(off, variables[NORM_COLLECTION])}


STANDARDIZATION_POLICIES = ("off", "on", "fold")
# Models whose every unit feeds its input to exactly one conv (its first layer), the conv that
# `earlier_standardizations="fold"` folds the standardization below it into.
FOLDABLE_MODELS = ("simple_cnn", "vgg16")


def kernel_scales(before: PyTree, after: PyTree) -> dict[tuple[str, ...], jax.Array]:
  """`{module path: ‖after‖ / ‖before‖}` (f32 scalar) of every `kernel` leaf of two params trees.

  1 where the kernel is unchanged (and where `before` is all zeros).
  """
  scales = {}
  after_flat = flat(after)
  for path, old in flat(before).items():
    if path[-1] == "kernel":
      old_norm = jnp.linalg.norm(old.astype(jnp.float32).ravel())
      new_norm = jnp.linalg.norm(after_flat[path].astype(jnp.float32).ravel())
      scales[path[:-1]] = jnp.where(old_norm > 0, new_norm / jnp.where(old_norm > 0, old_norm, 1),
                                    1.0)
  return scales


def scale_batch_stats(batch_stats: PyTree, scales: dict[tuple[str, ...], jax.Array]) -> PyTree:
  """Running statistics of each BatchNorm fed by a kernel scaled by s: mean × s, var × s².

  A bias-free conv whose kernel is multiplied by s multiplies its outputs by s; scaling the
  running mean and variance of the BatchNorm that follows it (paired by name, `Conv_0` with
  `BatchNorm_0`, `conv1` with `bn1`) keeps that BatchNorm's evaluation-mode output as it was,
  instead of leaving statistics that are stale until training has replaced them.

  Args:
    batch_stats: the `batch_stats` collection.
    scales: `kernel_scales(...)`: module path (below the collection) -> scalar factor.
  """
  out = {}
  for path, stat in flat(batch_stats).items():
    module, name = path[:-1], path[-1]
    factor = next((s for conv, s in scales.items()
                   if conv != module and transforms._pairs_with(conv, module)), None)  # pylint: disable=protected-access
    if factor is None or name not in ("mean", "var"):
      out[path] = stat
    else:
      out[path] = stat * (factor if name == "mean" else jnp.square(factor)).astype(stat.dtype)
  return unflat(out)


def _only(items: list, what: str):
  if len(items) != 1:
    raise ValueError(f"lw.earlier_standardizations='fold' needs exactly one {what}, found "
                     f"{len(items)}; accepted models: {', '.join(FOLDABLE_MODELS)}")
  return items[0]


def fold_standardizations(variables: PyTree, units: Sequence[str], k) -> PyTree:
  """Folds each active standardization below a kept unit into that unit's conv.

  For j with units[j+1] kept (j + 1 < k, k may be traced) and the standardization at the output
  of units[j] active: the conv of units[j+1], which reads that output x, gets its kernel divided
  per input channel by σ = sqrt(var + eps); its BatchNorm's running mean gets the constant
  Σ_{h,w,c} W'[h,w,c,o]·μ_c that `(x - μ)/σ` subtracted. The unit then computes from x what it
  computed from the standardized x (exactly in training mode, where BatchNorm removes the
  constant; in evaluation mode up to the zero-padded borders). The flags are left as they are:
  `lw_switch` switches them off afterwards. Units must hold one conv and one BatchNorm each.

  Args:
    variables: linen variables (params, batch_stats, norm).
    units: `layer_order(model)`, head last.
    k: the stage (int or traced int32).
  """
  params, stats, norm = flat(variables["params"]), flat(variables["batch_stats"]), \
      flat(variables[NORM_COLLECTION])
  for j in range(len(units) - 2):  # the head never reads a kept unit's standardized output
    lower, upper = units[j], units[j + 1]
    (standardization,) = {p[1] for p in norm if p[0] == lower}
    active = norm[(lower, standardization, "active")]
    mean, var = norm[(lower, standardization, "mean")], norm[(lower, standardization, "var")]
    kernel_path = _only([p for p in params if p[0] == upper and p[-1] == "kernel"
                         and params[p].ndim == 4], f"conv kernel in unit {upper!r}")
    mean_path = _only([p for p in stats if p[0] == upper and p[-1] == "mean"],
                      f"BatchNorm in unit {upper!r}")
    weight = active * (jnp.asarray(j + 1) < k).astype(jnp.float32)  # 1: fold, 0: leave
    kernel = params[kernel_path]
    folded = kernel / jnp.sqrt(var + Standardize.epsilon)[:, None].astype(kernel.dtype)
    shift = jnp.einsum("hwco,c->o", folded, mean.astype(kernel.dtype))
    params[kernel_path] = kernel + weight.astype(kernel.dtype) * (folded - kernel)
    stats[mean_path] = stats[mean_path] + weight * shift.astype(stats[mean_path].dtype)
  return {**variables, "params": unflat(params), "batch_stats": unflat(stats)}


def lw_transform(k: int, variables: PyTree, fresh: PyTree, memory: PyTree, *,
                 units: Sequence[str], rescale: bool = True, reset_batch_stats: bool = True,
                 rescale_zero_init: bool = True, earlier_standardizations: str = "off",
                 rescale_batch_stats: bool = True) -> PyTree:
  """LW's transform before stage k: keep units[:k] rescaled, reinitialize units[k:].

  Args:
    k: the stage, 1 <= k <= len(units) - 1: a Python int, or a traced int32 scalar.
    variables: linen variables with `params`, `batch_stats` and `norm` collections.
    fresh: `model.init(key_k, ...)`, same structure.
    memory: `{'init_norms': init_norms(initial variables)}`.
    units: `layer_order(model)`, bottom-up, head last.
    rescale: rescale the kept units' params to their norms at initialization.
    reset_batch_stats: reinitialize the running BatchNorm statistics of units[k:] too.
    rescale_zero_init: also rescale leaves whose init norm is zero (BatchNorm biases), which
      sets them to zero (the default, as LLF's re-implementation does); False keeps their
      trained values.
    earlier_standardizations: what happens to the standardizations switched on at earlier
      stages: `off` (identity; the unit above then reads unstandardized outputs), `on` (kept
      on with their statistics), `fold` (folded into the conv of the unit above, then off;
      `fold_standardizations`).
    rescale_batch_stats: scale the running statistics of the BatchNorms that follow rescaled
      kernels with them (`scale_batch_stats`), so they are not stale after the rescale.

  Returns:
    The variables for stage k (the trainer then switches on the standardization at the output
    of units[k-1] once it has statistics, `Plan.calibration`).
  """
  if earlier_standardizations not in STANDARDIZATION_POLICIES:
    raise ValueError(f"lw.earlier_standardizations={earlier_standardizations!r} is unknown; "
                     f"accepted: {', '.join(STANDARDIZATION_POLICIES)}")
  collections = ("params", "batch_stats") if reset_batch_stats else ("params",)
  above = unit_mask(variables, units, lambda i: i >= k)
  out = transforms.reinitialize(variables, fresh, restrict(above, collections))
  if earlier_standardizations == "fold":
    out = fold_standardizations(out, units, k)
  if rescale:
    kept = unit_mask(out["params"], units, lambda i: i < k)
    rescaled = transforms.rescale(out["params"], memory["init_norms"], kept)
    if not rescale_zero_init:
      # Data-dependent but traced: the switch stays one jittable function of its inputs.
      rescaled = jax.tree.map(lambda new, old, norm: jnp.where(norm > _ZERO_NORM, new, old),
                              rescaled, out["params"], memory["init_norms"])
    if rescale_batch_stats:
      out = {**out, "batch_stats": scale_batch_stats(out["batch_stats"],
                                                     kernel_scales(out["params"], rescaled))}
    out = {**out, "params": rescaled}
  return out if earlier_standardizations == "on" else deactivate_standardizations(out)


def changed(before: PyTree, after: PyTree) -> PyTree:
  """Leaf mask: a traced bool scalar per leaf, True where any entry of the leaf changed."""
  return jax.tree.map(lambda a, b: jnp.any(a != b), before, after)


def lw_begin(variables: PyTree, rng: jax.Array) -> PyTree:
  """LW's memory: the norms at initialization its kept units are rescaled to."""
  del rng
  return {"init_norms": init_norms(variables)}


def lw_switch(*, units: Sequence[str], **knobs):
  """LW's stage switch: `lw_transform` with these `knobs`; touched = every changed leaf.

  Reset, rescaled and folded leaves alike are touched: optimizer state kept for a rescaled
  kernel would push it at its old scale (`reset_optimizer=masked`).
  """
  def switch(k, variables, fresh, memory, rng):
    del rng
    out = lw_transform(k, variables, fresh, memory, units=units, **knobs)
    return Switched(out, memory, changed(variables["params"], out["params"]))
  return switch


def unit_moments(apply_fn: Callable[..., Any], variables: PyTree, images: jax.Array,
                 unit: str) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and variance of the output of `unit` over a few training batches.

  Runs the model in training mode (BatchNorm on batch statistics, as it runs while training;
  running statistics are not updated) over each batch of `images`, one after the other, and
  averages the first and second moments recorded at `unit`'s `Standardize`. Jitted with `unit`
  static, only the layers up to `unit` run: XLA drops those above, whose outputs are unused.

  Args:
    apply_fn: `model.apply`.
    variables: the variables right after the stage switch.
    images: (K, B, H, W, C), K training batches.
    unit: a top-level unit name that ends in a `Standardize`.

  Returns:
    (mean, var), each (C,) float32.
  """
  def moments(batch):
    _, state = apply_fn(variables, batch, train=True,
                        mutable=("batch_stats", MOMENTS_COLLECTION))
    (recorded,) = state[MOMENTS_COLLECTION][unit].values()
    return recorded["first"][0], recorded["second"][0]

  # lax.map, not vmap or a Python loop: in one program, concurrent forward passes would
  # compete for the CPU's cores.
  firsts, seconds = jax.lax.map(moments, jnp.asarray(images))
  mean = jnp.mean(firsts, axis=0)
  return mean, jnp.maximum(jnp.mean(seconds, axis=0) - jnp.square(mean), 0.0)


def set_standardization(variables: PyTree, unit: str, mean: jax.Array,
                        var: jax.Array) -> PyTree:
  """Switches on the standardization at the output of `unit` with these statistics. Pure."""
  norm = flax.core.unfreeze(variables[NORM_COLLECTION])
  (name,) = norm[unit].keys()
  norm[unit][name] = {"active": jnp.ones_like(norm[unit][name]["active"]),
                      "mean": mean, "var": var}
  return {**variables, NORM_COLLECTION: norm}


def calibrate_standardization(apply_fn: Callable[..., Any], variables: PyTree,
                              images: jax.Array, unit: str) -> PyTree:
  """Switches on the standardization at the output of `unit` with statistics from `images`.

  `unit_moments` over the batches `images`, then `set_standardization`; LW's calibration hook
  (`Calibration.apply`). Pure: returns new variables.

  Args:
    apply_fn: `model.apply`.
    variables: the variables right after the stage switch.
    images: (K, B, H, W, C), K training batches (or a sequence of K (B, H, W, C) arrays).
    unit: a top-level unit name that ends in a `Standardize`.
  """
  mean, var = unit_moments(apply_fn, variables, jnp.asarray(images), unit)
  return set_standardization(variables, unit, mean, var)


