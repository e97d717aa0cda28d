"""Pure transforms of parameter trees and optimizer states, and the masks that drive them.

Every function here is pure and `jax.jit`-able, works inside `jax.pmap`/`shard_map`, and keeps
the structure, shapes, dtypes and shardings of its input tree (see `_placed_like`). A mask leaf is
a Python bool (whole leaf: no work is done for False, so untouched leaves are returned as they
are) or a bool array of the leaf's shape (element-wise, evaluated with `jnp.where`). A *fresh*
tree is `model.init(new_key, ...)`.

Only jax, flax, optax and numpy are imported here: this module is the library core.
"""

from collections.abc import Mapping
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from reinit import tree as tree_lib

PyTree = Any


def _is_static(mask_leaf) -> bool:
  return isinstance(mask_leaf, bool)


def _placed_like(x, like):
  """`x` with the sharding of `like`, the input leaf an output leaf replaces.

  Eagerly, a concrete `like` gives its sharding (`device_put`; nothing is moved when `x` already
  has it). Under `jit`, the sharding in `like`'s type is used when its mesh axes are all Explicit
  (`jax.make_mesh`'s default); with Auto axes the type holds no sharding and XLA's propagation
  places the output (pass `out_shardings` to fix it), inside `pmap`/`shard_map` there is nothing
  to place. Leaves that are not JAX arrays (numpy, Python scalars) are returned as they are.
  """
  if jnp.shape(x) != jnp.shape(like):
    return x  # a whole-leaf (0-d) mask entry: broadcast, on any device
  if isinstance(like, jax.core.Tracer):
    sharding = jax.typeof(like).sharding
    if sharding.mesh.empty or not sharding.mesh.are_all_axes_explicit:
      return x
    return jax.sharding.reshard(x, sharding)
  if isinstance(like, jax.Array) and isinstance(x, jax.Array) and x.sharding != like.sharding:
    return jax.device_put(x, like.sharding)
  return x


def reinitialize(tree: PyTree, fresh: PyTree, mask: PyTree) -> PyTree:
  """`where(mask, fresh, tree)` leaf by leaf, in the dtype of `tree`.

  Args:
    tree: the current tree (e.g. trained `variables`).
    fresh: a tree of the same structure and shapes, e.g. `model.init(new_key, ...)`.
    mask: True where the fresh value replaces the current one.
  """
  def pick(leaf, fresh_leaf, m):
    if _is_static(m) and not m:
      return leaf
    fresh_leaf = _placed_like(jnp.asarray(fresh_leaf).astype(leaf.dtype), leaf)
    if _is_static(m):
      return fresh_leaf
    return jnp.where(_placed_like(m, leaf), fresh_leaf, leaf)
  return jax.tree.map(pick, tree, fresh, mask)


def _masked_norm(x, m):
  x = x.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(jnp.where(m, jnp.square(x), 0.0)))


def rescale(tree: PyTree, reference: PyTree, mask: PyTree, eps: float = 1e-6) -> PyTree:
  """For each masked leaf `p`: `p * ‖ref‖ / ‖p‖` (Frobenius); zero where `‖ref‖ <= eps`.

  Args:
    tree: the tree to rescale.
    reference: a tree of the same structure: either arrays of the leaves' shapes (e.g. the
      variables at initialization) or scalars holding the target norms directly (‖s‖ = |s|).
    mask: leaf or element mask; with an element mask, norms are taken over the masked entries
      only and only those entries are rescaled.
    eps: reference norms at or below it set the leaf (or its masked entries) to zero.
  """
  def scale(leaf, ref, m):
    if _is_static(m) and not m:
      return leaf
    where = _placed_like(jnp.broadcast_to(jnp.asarray(m), leaf.shape), leaf)
    ref = jnp.asarray(ref)
    ref_norm = (_masked_norm(_placed_like(ref, leaf), where) if ref.shape == leaf.shape
                else jnp.abs(ref.astype(jnp.float32)))
    leaf_norm = _masked_norm(leaf, where)
    factor = jnp.where(ref_norm > eps, ref_norm / jnp.maximum(leaf_norm, 1e-30), 0.0)
    scaled = _placed_like((leaf.astype(jnp.float32) * factor).astype(leaf.dtype), leaf)
    return scaled if _is_static(m) else jnp.where(where, scaled, leaf)
  return jax.tree.map(scale, tree, reference, mask)


def shrink_perturb(tree: PyTree, fresh: PyTree, *, shrink: float, perturb: float,
                   mask: PyTree | None = None) -> PyTree:
  """`shrink * p + perturb * fresh` on masked leaves (all leaves when `mask` is None)."""
  if mask is None:
    mask = jax.tree.map(lambda _: True, tree)

  def mix(leaf, fresh_leaf, m):
    if _is_static(m) and not m:
      return leaf
    fresh_leaf = _placed_like(jnp.asarray(fresh_leaf), leaf)
    mixed = _placed_like((shrink * leaf.astype(jnp.float32)
                          + perturb * fresh_leaf.astype(jnp.float32)).astype(leaf.dtype), leaf)
    return mixed if _is_static(m) else jnp.where(_placed_like(m, leaf), mixed, leaf)
  return jax.tree.map(mix, tree, fresh, mask)


def _exact_fraction_mask(key, n: int, fraction: float):
  """Bool (n,) with exactly round(fraction * n) True entries at random positions."""
  count = int(round(fraction * n))
  chosen = jax.random.permutation(key, n)[:count]
  return jnp.zeros((n,), jnp.bool_).at[chosen].set(True)


def _check_fraction(name: str, value: float) -> None:
  """One-line ValueError naming `name`, its value and the accepted range unless 0 <= value <= 1.

  The one check of a fraction, also for the methods' config fields (`ke.split_rate`, ...).
  """
  if not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{name}={value!r} is invalid; accepted: a fraction in [0, 1]")


def _module_and_variable(path: str, collection_first: bool) -> tuple[tuple[str, ...], str]:
  """'params/block0/Conv_0/kernel' -> (('block0', 'Conv_0'), 'kernel') for a variables tree."""
  parts = path.split("/")
  if collection_first:
    parts = parts[1:]
  return tuple(parts[:-1]), parts[-1]


_LAYER_TYPE_WORDS = re.compile(r"conv|batchnorm|batch_norm|groupnorm|layernorm|norm|bn|dense",
                               re.IGNORECASE)


def _site(name: str) -> str:
  """A module name without its layer-type word: what a conv shares with its BatchNorm.

  'Conv_0' and 'BatchNorm_0' -> '_0'; 'conv1' and 'bn1' -> '1'; 'shortcut_conv' and
  'shortcut_bn' -> 'shortcut_'; 'conv' and 'bn' -> ''.
  """
  return _LAYER_TYPE_WORDS.sub("", name, count=1)


def _pairs_with(conv_module: tuple[str, ...], other: tuple[str, ...]) -> bool:
  """Whether `other` holds per-channel entries of `conv_module`'s outputs.

  The module itself (its bias), or a sibling whose name differs only in the layer-type word
  (`Conv_0` <-> `BatchNorm_0`, `conv1` <-> `bn1`, `shortcut_conv` <-> `shortcut_bn`,
  `stem/conv` <-> `stem/bn`): the naming of linen's auto-names and of hand-named blocks.
  """
  if other == conv_module:
    return True
  if not conv_module or len(other) != len(conv_module) or other[:-1] != conv_module[:-1]:
    return False
  return (_LAYER_TYPE_WORDS.search(other[-1]) is not None
          and _site(conv_module[-1]) == _site(other[-1]))


def random_mask(key: jax.Array, tree: PyTree, *, fraction: float, granularity: str = "weight",
                within: PyTree | None = None) -> PyTree:
  """Element masks selecting exactly `round(fraction * size)` entries of each leaf in `within`.

  Args:
    key: PRNG key; leaf i uses `fold_in(key, i)`, so masks do not depend on other leaves.
    tree: the tree to mask (arrays or `jax.ShapeDtypeStruct`s).
    fraction: in [0, 1], the fraction of entries selected per leaf.
    granularity: "weight" selects entries; "filter" selects whole output channels (last axis of
      a kernel: `round(fraction * C_out)` of them) and the matching per-channel entries of that
      unit (its bias, and the sibling BatchNorm's scale/bias/mean/var, see `_pairs_with`), in
      every collection of a `variables` tree.
    within: leaf mask of the leaves to draw in; default all kernels (`tree.kernels`).

  Returns:
    A mask: bool arrays for leaves in `within` (and, for "filter", their paired leaves), Python
    False elsewhere.
  """
  _check_fraction("random_mask: fraction", fraction)
  if granularity not in ("weight", "filter"):
    raise ValueError(f"random_mask: granularity must be 'weight' or 'filter', got {granularity!r}")
  if within is None:
    within = tree_lib.kernels(tree)
  leaves, treedef = jax.tree.flatten(tree)
  chosen = jax.tree.leaves(within)
  leaf_paths = tree_lib.paths(tree)

  if granularity == "weight":
    out = [_exact_fraction_mask(jax.random.fold_in(key, i), x.size, fraction).reshape(x.shape)
           if c else False for i, (x, c) in enumerate(zip(leaves, chosen))]
    return jax.tree.unflatten(treedef, out)

  collection_first = tree_lib.has_collections(tree)
  names = [_module_and_variable(p, collection_first) for p in leaf_paths]
  out: list[Any] = [False] * len(leaves)
  for i, (x, c) in enumerate(zip(leaves, chosen)):
    if not c:
      continue
    channels = x.shape[-1] if x.ndim else 1
    per_channel = _exact_fraction_mask(jax.random.fold_in(key, i), channels, fraction)
    out[i] = jnp.broadcast_to(per_channel, x.shape) if x.ndim else per_channel[0]
    if names[i][1] != "kernel":
      continue
    for j, (y, (module, _)) in enumerate(zip(leaves, names)):
      if j != i and y.shape == (channels,) and _pairs_with(names[i][0], module):
        out[j] = per_channel
  return jax.tree.unflatten(treedef, out)


def magnitude_mask(tree: PyTree, *, sparsity: float, within: PyTree | None = None) -> PyTree:
  """True for the `round(sparsity * size)` smallest-|x| entries of each leaf in `within`.

  Layer-wise magnitude pruning as in Dense-Sparse-Dense; ties go to the lower flat index.
  `within` defaults to all kernels; other leaves get Python False.
  """
  _check_fraction("magnitude_mask: sparsity", sparsity)
  if within is None:
    within = tree_lib.kernels(tree)

  def smallest(x, c):
    if not c:
      return False
    count = int(round(sparsity * x.size))
    order = jnp.argsort(jnp.abs(x).ravel(), stable=True)[:count]
    return jnp.zeros((x.size,), jnp.bool_).at[order].set(True).reshape(x.shape)
  return jax.tree.map(smallest, tree, within)


def _params_part(tree: PyTree) -> PyTree:
  """The part of a mask (or params) tree that an optimizer sees: a tree over `variables` holds it
  under 'params'; over `optax.LookaheadParams`, the fast weights (whose state the fast optimizer
  keeps; the slow weights live in the params, not in the state)."""
  if isinstance(tree, optax.LookaheadParams):
    return tree.fast
  if isinstance(tree, Mapping) and "params" in tree:
    return tree["params"]
  return tree


def _param_copy_fields() -> dict[type, tuple[str, ...]]:
  """Optax state types holding copies of the parameters, and the fields that hold them.

  schedule-free's `z` (the averaged sequence the evaluation point is built from) and the initial
  points that distance-adaptive optimizers measure from (Mechanic, MADGRAD, Prodigy, DoG, DoWG,
  COCOB). Types missing from the installed optax are skipped.
  """
  contrib = getattr(optax, "contrib", None)
  names = {"ScheduleFreeState": ("z",), "MechanicState": ("x0",), "MadgradState": ("x0",),
           "ProdigyState": ("params0",), "DoGState": ("init_params",),
           "DoWGState": ("init_params",), "COCOBState": ("init_particles",)}
  return {getattr(contrib, name): fields for name, fields in names.items()
          if hasattr(contrib, name)}


def reset_opt_state(opt_state: PyTree, mask: PyTree, *, params: PyTree | None = None) -> PyTree:
  """Resets the parts of an optax state that belong to the parameters where `mask` is True.

  *Parameter-shaped* parts (momentum, Adam's moments, inside `chain`, `masked`,
  `inject_hyperparams`, ...) are the subtrees with the tree structure of the params mask
  (`optax.MaskedNode` placeholders included) and, leaf by leaf, the shapes of the params: those
  of `params` when given, else those of the mask's element-mask leaves (a Python-bool or 0-d
  leaf constrains the structure only). Their masked entries are set to zero. Step counters,
  hyperparameters and every other leaf are left untouched, as are masked-out (`MaskedNode`)
  entries. Averages of updates (`optax.ema`'s state, momenta) are zeroed like a momentum.

  States that hold *copies* of the parameters (`optax.contrib.schedule_free`'s `z`; the initial
  points `x0`/`params0`/`init_params`/`init_particles` of Mechanic, MADGRAD, Prodigy, DoG, DoWG
  and COCOB) are not zeroed: a reset entry restarts from its new value, so its copy is set to the
  entry of `params`, the parameters after the reset (for schedule-free, the evaluation point
  `schedule_free_eval_params` of a reset entry is then its new value). Such a state without
  `params` raises ValueError. `optax.lookahead` keeps its slow weights in the params
  (`optax.LookaheadParams`), not in its state: reset both halves with `reinitialize` (e.g. with
  `LookaheadParams.init_synced(fresh)`), and pass the mask (and `params`) over the
  `LookaheadParams` or over the fast params alone.

  Args:
    opt_state: any optax state.
    mask: a mask over `params`, over `variables` (its 'params' entry is used) or over
      `optax.LookaheadParams` (its fast half is used).
    params: the parameters after the reset, of the mask's structure (or `variables`, or
      `LookaheadParams`, as for `mask`). Required for states holding parameter copies, and when
      the params are a single array with a Python-bool mask (nothing else tells its moments from
      the step counter).

  Raises:
    ValueError: `params` does not have the mask's structure; a parameter-copy state without
      `params`; a single-array params tree with no shape to tell its moments from scalar
      counters and hyperparameters.
  """
  copy_fields_by_type = _param_copy_fields()
  params_mask = _params_part(mask)
  is_masked_node = lambda x: isinstance(x, optax.MaskedNode)
  mask_structure = jax.tree.structure(params_mask)
  if params is not None:
    params = _params_part(params)
    if jax.tree.structure(params) != mask_structure:
      raise ValueError("reset_opt_state: params must have the structure of the params mask, got "
                       f"{jax.tree.structure(params)} for a mask of {mask_structure}")
    shapes = [jnp.shape(p) for p in jax.tree.leaves(params)]
  else:
    # A Python bool, or a 0-d bool array (what a bool becomes under jit), masks the whole leaf.
    shapes = [jnp.shape(m) or None for m in jax.tree.leaves(params_mask)]
  if jax.tree_util.treedef_is_leaf(mask_structure) and shapes[0] in (None, ()):
    raise ValueError("reset_opt_state: a params tree of one array needs its shape (pass params= "
                     "or an element mask), and must not be a scalar: nothing else tells its "
                     "moments from the optimizer's scalar counters and hyperparameters")

  def is_params_shaped(node) -> bool:
    if jax.tree.structure(node, is_leaf=is_masked_node) != mask_structure:
      return False
    leaves = jax.tree.leaves(node, is_leaf=is_masked_node)
    return all(is_masked_node(x) or shape is None or jnp.shape(x) == shape
               for x, shape in zip(leaves, shapes))

  def zero_masked(node, m):
    if is_masked_node(node) or (_is_static(m) and not m):
      return node
    if _is_static(m):
      return jnp.zeros_like(node)
    return jnp.where(_placed_like(m, node), jnp.zeros_like(node), node)

  def copy_masked(node, p, m):
    if is_masked_node(node) or (_is_static(m) and not m):
      return node
    p = _placed_like(jnp.asarray(p).astype(node.dtype), node)
    if _is_static(m):
      return p
    return jnp.where(_placed_like(m, node), p, node)

  def is_stop(node) -> bool:
    return type(node) in copy_fields_by_type or is_params_shaped(node)

  def visit(node):
    copy_fields = copy_fields_by_type.get(type(node))
    if copy_fields is not None:
      if params is None:
        raise ValueError(f"reset_opt_state: {type(node).__name__}.{'/'.join(copy_fields)} holds "
                         "a copy of the parameters; pass params= (the parameters after the "
                         "reset) to set its reset entries to them")
      return type(node)(**{
          name: (jax.tree.map(copy_masked, value, params, params_mask, is_leaf=is_masked_node)
                 if name in copy_fields else jax.tree.map(visit, value, is_leaf=is_stop))
          for name, value in node._asdict().items()})
    if is_params_shaped(node):
      return jax.tree.map(zero_masked, node, params_mask, is_leaf=is_masked_node)
    return node

  return jax.tree.map(visit, opt_state, is_leaf=is_stop)
