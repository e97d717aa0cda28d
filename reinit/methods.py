"""Reinitialization methods as plans of stages built from the public transforms.

A method is a `Plan`: stages, each with its epochs and peak learning rate, and a stage switch,
a pure function `(k, variables, fresh, memory, rng) -> Switched(variables, memory, touched)`
applied before stage k >= 1. Every argument may be traced, k included: the trainer compiles
one switch per run, not one per stage. `memory` is the method's bookkeeping, drawn at stage 0 by `Plan.begin(variables, rng)`
(LW's norms at initialization, KE's split key, DSD's keep mask); it is a pytree of arrays, so it
is checkpointed with the state. `touched` is a mask over `params` of what the switch changed
(the optimizer policy `reset_optimizer=masked` zeroes the optimizer state there).

The trainer knows nothing else of a method: it draws `fresh = model.init(fold_in(key, k), ...)`,
calls the switch, calibrates the standardization `calibrate_unit(k)` names, holds the params
where `memory['keep']` is False at zero when `holds_zeros`, and trains.

`units` is `reinit.layer_order(model, ...)`: bottom-up, head last; K = len(units) - 1. Every
method that reinitializes uses the same number of stages, K + 1, capped by `num_stages`.
"""

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from reinit import transforms
from reinit import tree as tree_lib
from reinit.models.standardize import MOMENTS_COLLECTION, NORM_COLLECTION, Standardize

PyTree = Any

_ZERO_NORM = 1e-6  # init norms at or below it mark zero-initialized leaves (biases)

METHODS = ("baseline", "baseline_long", "restarts", "lw", "lw_norescale", "lw_nonorm", "head",
           "llf", "ke", "rand", "sp", "dsd")
COMPARABLE = tuple(m for m in METHODS if m not in ("baseline_long", "restarts"))


class Switched(NamedTuple):
  """What a stage switch returns: new variables, new memory, and a params mask of changes."""
  variables: PyTree
  memory: PyTree
  touched: PyTree


def _nothing(params: PyTree) -> PyTree:
  return jax.tree.map(lambda _: False, params)


def _keep_all(k, variables, fresh, memory, rng) -> Switched:
  """No transform: the switch of `restarts` (only optimizer and schedule restart)."""
  del k, fresh, rng
  return Switched(variables, memory, _nothing(variables["params"]))


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a method does, stage by stage.

  Attributes:
    name: the method's name.
    epochs: epochs of each stage; `len(epochs)` is the number of stages.
    learning_rates: peak learning rate of each stage.
    begin: `(variables, rng) -> memory`, run once on the initial variables.
    switch: `(k, variables, fresh, memory, rng) -> Switched`, the transform before stage k >= 1.
    calibrate_unit: `k -> unit name or None`, the unit whose output standardization is switched
      on (with statistics from training batches) right after the switch to stage k.
    holds_zeros: the train step keeps params at zero where `memory['keep']` is False (DSD).
  """
  name: str
  epochs: tuple[int, ...]
  learning_rates: tuple[float, ...]
  begin: Callable[[PyTree, jax.Array], PyTree] = lambda variables, rng: {}
  switch: Callable[..., Switched] = _keep_all
  calibrate_unit: Callable[[int], str | None] = lambda k: None
  holds_zeros: bool = False

  @property
  def num_stages(self) -> int:
    return len(self.epochs)


def _cap_stages(num_stages: int | None, available: int) -> int:
  """Stages actually run: all `available` when `num_stages` is None or -1, else the cap."""
  if num_stages is None or num_stages == -1:
    return available
  return max(1, min(int(num_stages), available))


def _unit_index(spec, units: Sequence[str]) -> int:
  """A unit given by name or by index (negative counts from the top) -> its index."""
  if isinstance(spec, str) and spec.lstrip("-").isdigit():
    spec = int(spec)
  if isinstance(spec, int):
    if not -len(units) < spec < len(units):
      raise ValueError(f"llf.reset_from={spec} is out of range; accepted: a unit name in "
                       f"{list(units)} or an index in [{1 - len(units)}, {len(units) - 1}]")
    return spec % len(units)
  if spec not in units:
    raise ValueError(f"llf.reset_from={spec!r} is unknown; accepted: a unit name in "
                     f"{list(units)} or an index")
  return units.index(spec)


# ---------------------------------------------------------------- LW


def init_norms(variables: PyTree) -> PyTree:
  """Frobenius norm (float32 scalar) of every `params` leaf: LW's rescaling targets."""
  return jax.tree.map(lambda p: jnp.linalg.norm(p.astype(jnp.float32).ravel()),
                      variables["params"])


def deactivate_standardizations(variables: PyTree) -> PyTree:
  """Sets every `norm/.../active` flag to 0 (identity), values only."""
  def off(path, leaf):
    return jnp.zeros_like(leaf) if path.endswith("/active") else leaf
  return {**variables, NORM_COLLECTION: tree_lib.map_with_path(off, variables[NORM_COLLECTION])}


def _restrict(mask: PyTree, collections: Sequence[str]) -> PyTree:
  """A mask over `variables`, False outside `collections`."""
  return {c: mask[c] if c in collections else jax.tree.map(lambda _: False, mask[c])
          for c in mask}


def _reset_mask(variables: PyTree, layers: Sequence[str], reset_batch_stats: bool) -> PyTree:
  """Leaf mask of `layers` in `params` (and `batch_stats` when asked), False elsewhere."""
  collections = ("params", "batch_stats") if reset_batch_stats else ("params",)
  return _restrict(tree_lib.select(variables, layers=layers), collections)


def unit_mask(tree: PyTree, units: Sequence[str], chosen: Callable[[int], Any]) -> PyTree:
  """Leaf mask: `chosen(i)` for the leaves of units[i], False for leaves of no unit.

  `chosen` may compare with a traced stage index (`lambda i: i >= k`): the leaves are then
  traced bool scalars and one compiled switch serves every stage.
  """
  per_unit = [tree_lib.select(tree, layers=[unit]) for unit in units]

  def leaf(*in_unit):
    index = next((i for i, m in enumerate(in_unit) if m), None)
    return False if index is None else chosen(index)
  return jax.tree.map(leaf, *per_unit)


STANDARDIZATION_POLICIES = ("off", "on", "fold")
# Models whose every unit feeds its input to exactly one conv (its first layer), the conv that
# `earlier_standardizations="fold"` folds the standardization below it into.
FOLDABLE_MODELS = ("simple_cnn", "vgg16")


def _flat(tree: PyTree) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _unflat(flat: dict[tuple[str, ...], Any]) -> PyTree:
  return flax.traverse_util.unflatten_dict(flat)


def kernel_scales(before: PyTree, after: PyTree) -> dict[tuple[str, ...], jax.Array]:
  """`{module path: ‖after‖ / ‖before‖}` (f32 scalar) of every `kernel` leaf of two params trees.

  1 where the kernel is unchanged (and where `before` is all zeros).
  """
  scales = {}
  after_flat = _flat(after)
  for path, old in _flat(before).items():
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
  for path, stat in _flat(batch_stats).items():
    module, name = path[:-1], path[-1]
    factor = next((s for conv, s in scales.items()
                   if conv != module and transforms._pairs_with(conv, module)), None)  # pylint: disable=protected-access
    if factor is None or name not in ("mean", "var"):
      out[path] = stat
    else:
      out[path] = stat * (factor if name == "mean" else jnp.square(factor)).astype(stat.dtype)
  return _unflat(out)


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
  params, stats, norm = _flat(variables["params"]), _flat(variables["batch_stats"]), \
      _flat(variables[NORM_COLLECTION])
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
  return {**variables, "params": _unflat(params), "batch_stats": _unflat(stats)}


def lw_switch(k: int, variables: PyTree, fresh: PyTree, memory: PyTree, *, units: Sequence[str],
              rescale: bool = True, reset_batch_stats: bool = True,
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
    of units[k-1] once it has statistics, `Plan.calibrate_unit`).
  """
  if earlier_standardizations not in STANDARDIZATION_POLICIES:
    raise ValueError(f"lw.earlier_standardizations={earlier_standardizations!r} is unknown; "
                     f"accepted: {', '.join(STANDARDIZATION_POLICIES)}")
  collections = ("params", "batch_stats") if reset_batch_stats else ("params",)
  above = unit_mask(variables, units, lambda i: i >= k)
  out = transforms.reinitialize(variables, fresh, _restrict(above, collections))
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
                              images: Sequence[jax.Array], unit: str) -> PyTree:
  """Switches on the standardization at the output of `unit` with statistics from `images`.

  `unit_moments` over the batches `images` (each (B, H, W, C)), then `set_standardization`.
  Pure: returns new variables.

  Args:
    apply_fn: `model.apply`.
    variables: the variables right after the stage switch.
    images: a few training batches, each (B, H, W, C).
    unit: a top-level unit name that ends in a `Standardize`.
  """
  mean, var = unit_moments(apply_fn, variables, jnp.stack(images), unit)
  return set_standardization(variables, unit, mean, var)


# ---------------------------------------------------------------- the other methods


def layers_switch(layers: Sequence[str], *, reset_batch_stats: bool = True):
  """A switch that reinitializes `layers` every stage (head: the head; llf: units[k0:])."""
  def switch(k, variables, fresh, memory, rng):
    del k, rng
    mask = _reset_mask(variables, layers, reset_batch_stats)
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
  flat = _flat(params)
  for path, leaf in flat.items():
    module, name, unit = path[:-1], path[-1], path[0]
    has_kernel = (*module, "kernel") in flat
    if name == "kernel" and leaf.ndim >= 2:
      c_in, c_out = leaf.shape[-2:]
      rows = c_in if unit == first and leaf.ndim == 4 else slim(c_in)
      cols = c_out if unit == head else slim(c_out)
      out[path] = leading(leaf.shape, (*leaf.shape[:-2], rows, cols))
    elif name == "bias" and has_kernel:
      out[path] = leading(leaf.shape, (leaf.shape[-1] if unit == head else slim(leaf.shape[-1]),))
    else:
      out[path] = True
  return _unflat(out)


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


def sp_switch(*, shrink: float, perturb: float):
  """Shrink-and-perturb: every param becomes `shrink * p + perturb * fresh`."""
  def switch(k, variables, fresh, memory, rng):
    del k, rng
    params = transforms.shrink_perturb(variables["params"], fresh["params"], shrink=shrink,
                                       perturb=perturb)
    return Switched({**variables, "params": params}, memory,
                    jax.tree.map(lambda _: True, params))
  return switch


def dsd_begin(variables, rng):
  """DSD starts dense: every param kept."""
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


# ---------------------------------------------------------------- plans


def make_plan(config, units: Sequence[str]) -> Plan:
  """The plan of `config.method` for a model whose units are `units`.

  Reads `config.method`, `epochs_per_stage`, `num_stages`, `learning_rate`, `compare_with`
  and the method's own knobs (`config.lw`, `config.llf`, `config.ke`, `config.rand`,
  `config.sp`, `config.dsd`).

  Raises:
    ValueError: unknown method or knob value (names the accepted ones).
  """
  name = config.method
  if name not in METHODS:
    raise ValueError(f"method={name!r} is unknown; accepted: {', '.join(METHODS)}")
  epochs, lr = int(config.epochs_per_stage), float(config.learning_rate)
  stages = _cap_stages(config.num_stages, len(units))

  def repeated(**kwargs) -> Plan:
    return Plan(name, (epochs,) * stages, (lr,) * stages, **kwargs)

  if name == "baseline":
    return Plan(name, (epochs,), (lr,))
  if name in ("baseline_long", "restarts"):
    if config.compare_with not in COMPARABLE:
      raise ValueError(f"compare_with={config.compare_with!r} is invalid; accepted: "
                       f"{', '.join(COMPARABLE)}")
    other = config.copy_and_resolve_references()
    other.method = config.compare_with
    compared = make_plan(other, units)
    if name == "baseline_long":
      return Plan(name, (sum(compared.epochs),), (lr,))
    return Plan(name, compared.epochs, compared.learning_rates, switch=_keep_all)

  if name in ("lw", "lw_norescale", "lw_nonorm"):
    lw = config.lw
    rescale = bool(lw.rescale) and name != "lw_norescale"
    normalize = bool(lw.normalize) and name != "lw_nonorm"
    policy = lw.earlier_standardizations
    if policy not in STANDARDIZATION_POLICIES:
      raise ValueError(f"lw.earlier_standardizations={policy!r} is unknown; accepted: "
                       f"{', '.join(STANDARDIZATION_POLICIES)}")
    if policy == "fold" and config.model not in FOLDABLE_MODELS:
      raise ValueError(f"lw.earlier_standardizations='fold' is not defined for "
                       f"model={config.model!r}; accepted: off or on, or fold with a model in "
                       f"{', '.join(FOLDABLE_MODELS)}")

    def switch(k, variables, fresh, memory, rng):
      del rng
      out = lw_switch(k, variables, fresh, memory, units=units, rescale=rescale,
                      reset_batch_stats=bool(lw.reset_batch_stats),
                      rescale_zero_init=bool(lw.rescale_zero_init),
                      earlier_standardizations=policy,
                      rescale_batch_stats=bool(lw.rescale_batch_stats))
      # Reset, rescaled and folded leaves alike: optimizer state kept for a rescaled kernel
      # would push it at its old scale (`reset_optimizer=masked`).
      return Switched(out, memory, changed(variables["params"], out["params"]))

    return repeated(begin=lambda variables, rng: {"init_norms": init_norms(variables)},
                    switch=switch,
                    calibrate_unit=lambda k: units[k - 1] if normalize else None)
  if name == "head":
    return repeated(switch=layers_switch(units[-1:]))
  if name == "llf":
    start = _unit_index(config.llf.reset_from, units)
    return repeated(switch=layers_switch(units[start:],
                                         reset_batch_stats=bool(config.llf.reset_batch_stats)))
  if name == "ke":
    granularity = config.ke.split_granularity
    if granularity not in ("weight", "filter"):
      raise ValueError(f"ke.split_granularity={granularity!r} is unknown; accepted: weight "
                       "(WELS), filter (KELS)")
    _check_fraction("ke.split_rate", config.ke.split_rate)
    # Raw key data, not a typed key: memory is checkpointed as plain arrays.
    return repeated(begin=lambda variables, rng: {"split_key": jax.random.key_data(rng)},
                    switch=ke_switch(split_rate=float(config.ke.split_rate),
                                     granularity=granularity, units=units))
  if name == "rand":
    _check_fraction("rand.fraction", config.rand.fraction)
    return repeated(switch=rand_switch(fraction=float(config.rand.fraction)))
  if name == "sp":
    return repeated(switch=sp_switch(shrink=float(config.sp.shrink),
                                     perturb=float(config.sp.perturb)))
  # dsd: dense, sparse, dense at a lower learning rate (Han et al. 2017), in the epochs every
  # other method gets (stages x epochs_per_stage), shared evenly; num_stages caps the phases.
  _check_fraction("dsd.sparsity", config.dsd.sparsity)
  phases = min(3, stages)
  total = stages * epochs
  return Plan(name, tuple(total // phases + (i < total % phases) for i in range(phases)),
              (lr, lr, lr * float(config.dsd.lr_factor))[:phases],
              begin=dsd_begin, switch=dsd_switch(sparsity=float(config.dsd.sparsity)),
              holds_zeros=True)


def _check_fraction(field: str, value) -> None:
  if not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{field}={value!r} is invalid; accepted: a fraction in [0, 1]")
