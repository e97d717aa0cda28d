"""Reinitialization methods as plans of stages built from the public transforms.

A method is a `Plan`: a number of stages, each with its epochs and peak learning rate, and a
stage switch, a pure function `(k, variables, fresh, memory) -> variables` applied before stage
k >= 1. `memory` is the method's bookkeeping drawn once at stage 0 by `Plan.begin` (e.g. LW's
norms at initialization); it is a pytree, so it is checkpointed with the state. The trainer
knows nothing else of a method: it creates `fresh = model.init(fold_in(key, k), ...)`, calls
the switch, calibrates the standardization the plan names, and trains with a fresh optimizer
state and a restarted schedule.

`units` is `reinit.layer_order(model, ...)`: bottom-up, head last; K = len(units) - 1.
"""

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from reinit import transforms
from reinit import tree as tree_lib
from reinit.models.standardize import MOMENTS_COLLECTION, NORM_COLLECTION

PyTree = Any
Switch = Callable[[int, PyTree, PyTree, PyTree], PyTree]

_ZERO_NORM = 1e-6  # init norms at or below it mark zero-initialized leaves (biases)

METHODS = ("baseline", "baseline_long", "lw", "lw_norescale", "lw_nonorm")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a method does, stage by stage.

  Attributes:
    name: the method's name.
    epochs: epochs of each stage; `len(epochs)` is the number of stages.
    learning_rates: peak learning rate of each stage.
    begin: `variables -> memory`, run once on the initial variables.
    switch: `(k, variables, fresh, memory) -> variables`, the transform before stage k >= 1.
    calibrate_unit: `k -> unit name or None`, the unit whose output standardization is switched
      on (with statistics from training batches) right after the switch to stage k.
  """
  name: str
  epochs: tuple[int, ...]
  learning_rates: tuple[float, ...]
  begin: Callable[[PyTree], PyTree]
  switch: Switch
  calibrate_unit: Callable[[int], str | None]

  @property
  def num_stages(self) -> int:
    return len(self.epochs)


def _no_memory(variables):
  del variables
  return {}


def _keep(k, variables, fresh, memory):
  del k, fresh, memory
  return variables


def _never(k):
  del k
  return None


def _cap_stages(num_stages: int | None, available: int) -> int:
  """Stages actually run: all `available` when `num_stages` is None or -1, else the cap."""
  if num_stages is None or num_stages == -1:
    return available
  return max(1, min(int(num_stages), available))


def init_norms(variables: PyTree) -> PyTree:
  """Frobenius norm (float32 scalar) of every `params` leaf: LW's rescaling targets."""
  return jax.tree.map(lambda p: jnp.linalg.norm(p.astype(jnp.float32).ravel()),
                      variables["params"])


def deactivate_standardizations(variables: PyTree) -> PyTree:
  """Sets every `norm/.../active` flag to 0 (identity), values only."""
  def off(path, leaf):
    return jnp.zeros_like(leaf) if path.endswith("/active") else leaf
  return {**variables, NORM_COLLECTION: tree_lib.map_with_path(off, variables[NORM_COLLECTION])}


def lw_switch(k: int, variables: PyTree, fresh: PyTree, memory: PyTree, *, units: Sequence[str],
              rescale: bool = True, reset_batch_stats: bool = True,
              rescale_zero_init: bool = False) -> PyTree:
  """LW's transform before stage k: keep units[:k] rescaled, reinitialize units[k:].

  Args:
    k: the stage, 1 <= k <= len(units) - 1.
    variables: linen variables with `params`, `batch_stats` and `norm` collections.
    fresh: `model.init(key_k, ...)`, same structure.
    memory: `{'init_norms': init_norms(initial variables)}`.
    units: `layer_order(model)`, bottom-up, head last.
    rescale: rescale the kept units' params to their norms at initialization.
    reset_batch_stats: reinitialize the running BatchNorm statistics of units[k:] too.
    rescale_zero_init: also rescale leaves whose init norm is zero (BatchNorm biases), which
      sets them to zero; by default they keep their trained values.

  Returns:
    The variables for stage k, with every standardization switched off (the trainer switches on
    the one at the output of units[k-1] once it has statistics, see `calibrate_standardization`).
  """
  reset_collections = ("params", "batch_stats") if reset_batch_stats else ("params",)
  above = tree_lib.select(variables, layers=units[k:])
  reset = {c: (above[c] if c in reset_collections else jax.tree.map(lambda _: False, above[c]))
           for c in above}
  out = transforms.reinitialize(variables, fresh, reset)
  if rescale:
    kept = tree_lib.select(out["params"], layers=units[:k])
    rescaled = transforms.rescale(out["params"], memory["init_norms"], kept)
    if not rescale_zero_init:
      # Data-dependent but traced: the switch stays one jittable function of its inputs.
      rescaled = jax.tree.map(lambda new, old, norm: jnp.where(norm > _ZERO_NORM, new, old),
                              rescaled, out["params"], memory["init_norms"])
    out = {**out, "params": rescaled}
  return deactivate_standardizations(out)


def calibrate_standardization(apply_fn: Callable[..., Any], variables: PyTree,
                              images: Sequence[jax.Array], unit: str) -> PyTree:
  """Switches on the standardization at the output of `unit` with statistics from `images`.

  Runs the model in training mode (BatchNorm on batch statistics, as it runs while training;
  running statistics are not updated) over each batch of `images`, averages the per-channel
  first and second moments recorded at `unit`'s `Standardize`, and writes `mean`, `var` and
  `active = 1` there. Pure: returns new variables.

  Args:
    apply_fn: `model.apply`.
    variables: the variables right after the stage switch.
    images: a few training batches, each (B, H, W, C).
    unit: a top-level unit name that ends in a `Standardize`.
  """
  firsts, seconds = [], []
  for batch in images:
    _, state = apply_fn(variables, batch, train=True,
                        mutable=("batch_stats", MOMENTS_COLLECTION))
    moments = state[MOMENTS_COLLECTION][unit]
    (standardize_name,) = moments.keys()
    firsts.append(moments[standardize_name]["first"][0])
    seconds.append(moments[standardize_name]["second"][0])
  mean = jnp.mean(jnp.stack(firsts), axis=0)
  var = jnp.maximum(jnp.mean(jnp.stack(seconds), axis=0) - jnp.square(mean), 0.0)
  norm = flax.core.unfreeze(variables[NORM_COLLECTION])
  norm[unit][standardize_name] = {
      "active": jnp.ones_like(norm[unit][standardize_name]["active"]),
      "mean": mean, "var": var}
  return {**variables, NORM_COLLECTION: norm}


def make_plan(config, units: Sequence[str]) -> Plan:
  """The plan of `config.method` for a model whose units are `units`.

  Reads `config.method`, `config.epochs_per_stage`, `config.num_stages`, `config.learning_rate`
  and the method's own knobs (`config.lw.*`, `config.baseline_long.compare_with`).

  Raises:
    ValueError: unknown method (names the accepted ones).
  """
  name = config.method
  if name not in METHODS:
    raise ValueError(f"method={name!r} is unknown; accepted: {', '.join(METHODS)}")
  epochs, lr = int(config.epochs_per_stage), float(config.learning_rate)
  num_units = len(units)

  if name == "baseline":
    return Plan(name, (epochs,), (lr,), _no_memory, _keep, _never)

  if name == "baseline_long":
    compared = config.baseline_long.compare_with
    compared_stages = make_plan(_with_method(config, compared), units).num_stages
    return Plan(name, (epochs * compared_stages,), (lr,), _no_memory, _keep, _never)

  # lw and its ablations: stage k keeps units[:k]; K = num_units - 1 reinitialization stages.
  lw = config.lw
  rescale = bool(lw.rescale) and name != "lw_norescale"
  normalize = bool(lw.normalize) and name != "lw_nonorm"
  stages = _cap_stages(config.num_stages, num_units)

  def switch(k, variables, fresh, memory):
    return lw_switch(k, variables, fresh, memory, units=units, rescale=rescale,
                     reset_batch_stats=bool(lw.reset_batch_stats),
                     rescale_zero_init=bool(lw.rescale_zero_init))

  def calibrate_unit(k):
    return units[k - 1] if normalize else None

  def begin(variables):
    return {"init_norms": init_norms(variables)}

  return Plan(name, (epochs,) * stages, (lr,) * stages, begin, switch, calibrate_unit)


def _with_method(config, method: str):
  if method == "baseline_long":
    raise ValueError("baseline_long.compare_with must name another method, not baseline_long")
  other = config.copy_and_resolve_references()
  other.method = method
  return other
