"""What a method is to the trainer: a `Plan` of stages, each started by a pure switch.

A switch is `(k, variables, fresh, memory, rng) -> Switched(variables, memory, touched)`, applied
before stage k >= 1; every argument may be traced, k included, so the trainer compiles one
switch per run, not one per stage. `memory` is the method's bookkeeping, a pytree of arrays
drawn at stage 0 by `Plan.begin(variables, rng)` and checkpointed with the state. `touched` is a
mask over `params` of what the switch changed (`reset_optimizer=masked` zeroes the optimizer
state there).
"""

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any, NamedTuple

import flax
import jax
import optax

from reinit import tree as tree_lib

PyTree = Any


class Switched(NamedTuple):
  """What a stage switch returns: new variables, new memory, and a params mask of changes."""
  variables: PyTree
  memory: PyTree
  touched: PyTree


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Statistics drawn from training batches right after a switch (LW's standardization).

  Attributes:
    batches: training batches each calibration reads.
    unit: `k -> unit name or None`, what to calibrate right after the switch to stage k.
    apply: `(apply_fn, variables, images, unit) -> variables`, pure; images (batches, B, H, W,
      C). The trainer jits it with `unit` static.
  """
  batches: int
  unit: Callable[[int], str | None]
  apply: Callable[..., PyTree]


def no_memory(variables: PyTree, rng: jax.Array) -> PyTree:
  """`Plan.begin` of methods that keep no bookkeeping."""
  del variables, rng
  return {}


def nothing(params: PyTree) -> PyTree:
  """The mask that touches no leaf."""
  return jax.tree.map(lambda _: False, params)


def keep_all_switch(k, variables, fresh, memory, rng) -> Switched:
  """No transform: the switch of `restarts` (only optimizer and schedule restart)."""
  del k, fresh, rng
  return Switched(variables, memory, nothing(variables["params"]))


def same_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`Plan.optimizer` of methods that train with the trainer's optimizer as it is."""
  return tx


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a method does, stage by stage; everything the trainer knows of it.

  Attributes:
    name: the method's name.
    epochs: epochs of each stage; `len(epochs)` is the number of stages.
    learning_rates: peak learning rate of each stage.
    begin: `(variables, rng) -> memory`, run once on the initial variables.
    switch: `(k, variables, fresh, memory, rng) -> Switched`, the transform before stage k >= 1.
    calibration: statistics set right after a switch, or None.
    optimizer: wraps the trainer's optimizer; the wrapped one's `update` is called with the
      keyword `memory=` (the method's memory), e.g. DSD's `hold_at_zero`.
  """
  name: str
  epochs: tuple[int, ...]
  learning_rates: tuple[float, ...]
  begin: Callable[[PyTree, jax.Array], PyTree] = no_memory
  switch: Callable[..., Switched] = keep_all_switch
  calibration: Calibration | None = None
  optimizer: Callable[[optax.GradientTransformation],
                      optax.GradientTransformation] = same_optimizer

  @property
  def num_stages(self) -> int:
    return len(self.epochs)

  def calibrated_unit(self, k: int) -> str | None:
    """The unit calibrated right after the switch to stage k, or None."""
    return None if self.calibration is None else self.calibration.unit(k)


def flat(tree: PyTree) -> dict[tuple[str, ...], Any]:
  """`{key tuple: leaf}` of a nested dict (FrozenDicts too)."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def unflat(leaves: dict[tuple[str, ...], Any]) -> PyTree:
  return flax.traverse_util.unflatten_dict(leaves)


def restrict(mask: PyTree, collections: Sequence[str]) -> PyTree:
  """A mask over `variables`, False outside `collections`."""
  return {c: mask[c] if c in collections else jax.tree.map(lambda _: False, mask[c])
          for c in mask}


def reset_mask(variables: PyTree, layers: Sequence[str], reset_batch_stats: bool) -> PyTree:
  """Leaf mask of `layers` in `params` (and `batch_stats` when asked), False elsewhere."""
  collections = ("params", "batch_stats") if reset_batch_stats else ("params",)
  return restrict(tree_lib.select(variables, layers=layers), collections)


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
