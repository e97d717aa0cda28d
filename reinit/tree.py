"""Paths, selection and layer order over pytrees of arrays.

A *path* is the `/`-joined key path of a leaf, e.g. `params/block3/Conv_0/kernel`. A *mask* is a
pytree with the structure of the tree it describes whose leaves are Python bools (whole leaf) or
bool arrays of the leaf's shape (element-wise); True means "touched".

Only jax, flax and numpy are imported here: this module is the library core.
"""

from collections.abc import Sequence
import re
from typing import Any

import flax.linen as nn
import jax

PyTree = Any

# Flax NNX `State` leaves carry their array under `.value`; it names no unit, so it is dropped.
_NNX_VALUE_KEY = "value"


def _key_name(key) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def key_path_to_str(key_path) -> str:
  """`(DictKey('params'), DictKey('head'), DictKey('kernel'))` -> `'params/head/kernel'`."""
  names = [_key_name(k) for k in key_path]
  if (len(names) > 1 and isinstance(key_path[-1], jax.tree_util.GetAttrKey)
      and names[-1] == _NNX_VALUE_KEY):
    names = names[:-1]
  return "/".join(names)


def paths(tree: PyTree) -> list[str]:
  """Leaf paths of `tree`, in `jax.tree.leaves` order."""
  with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [key_path_to_str(kp) for kp, _ in with_path]


def map_with_path(fn, tree: PyTree, *rest: PyTree, is_leaf=None) -> PyTree:
  """`jax.tree.map` where `fn(path, leaf, *rest_leaves)` also receives the leaf's path string."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, *leaves: fn(key_path_to_str(kp), *leaves), tree, *rest, is_leaf=is_leaf)


def _path_views(path: str) -> tuple[str, ...]:
  """The path read from its first component, and from its second (collection name dropped)."""
  head, sep, tail = path.partition("/")
  return (path, tail) if sep else (path,)


def _under(path: str, layer: str) -> bool:
  return path == layer or path.startswith(layer + "/")


def select(tree: PyTree, *, layers: Sequence[str] = (), include: Sequence[str] = (),
           exclude: Sequence[str] = ()) -> PyTree:
  """Leaf-level mask (Python bools) of the leaves under `layers` or matching `include`.

  A leaf is selected when its path, read from its first component or from its second (so a
  `variables` dict and a bare `params` tree both work), equals or starts with `layer + '/'` for
  one of `layers`, or when its full path full-matches a regex in `include`. Leaves whose full path
  full-matches a regex in `exclude` are then removed.

  Args:
    tree: any pytree of arrays, e.g. linen `variables` or `params`, or an NNX `State`.
    layers: module paths as given by `layer_order`, e.g. `('block0', 'stem/Conv_0')`.
    include: regexes over full leaf paths.
    exclude: regexes over full leaf paths.

  Returns:
    A pytree of Python bools with the structure of `tree`.

  Raises:
    ValueError: a name in `layers` matches no leaf (names the unknown layers).
  """
  if isinstance(layers, str) or isinstance(include, str) or isinstance(exclude, str):
    raise TypeError("select: layers, include and exclude take sequences of strings, not a str")
  include_res = [re.compile(p) for p in include]
  exclude_res = [re.compile(p) for p in exclude]
  leaf_paths = paths(tree)
  unknown = [layer for layer in layers
             if not any(_under(view, layer) for p in leaf_paths for view in _path_views(p))]
  if unknown:
    raise ValueError(f"select: unknown layers {unknown}; known top-level units: "
                     f"{sorted({v.split('/')[0] for p in leaf_paths for v in _path_views(p)[-1:]})}")

  def is_selected(path: str) -> bool:
    chosen = (any(_under(view, layer) for layer in layers for view in _path_views(path))
              or any(r.fullmatch(path) for r in include_res))
    return chosen and not any(r.fullmatch(path) for r in exclude_res)

  return map_with_path(lambda path, _: is_selected(path), tree)


def mask_or(*masks: PyTree) -> PyTree:
  """Leaf-wise OR of masks of one structure (Python bools stay Python bools)."""
  return jax.tree.map(lambda *ms: _or(ms), *masks)


def _or(leaves):
  out = leaves[0]
  for m in leaves[1:]:
    out = out | m
  return out


def mask_not(mask: PyTree) -> PyTree:
  """Leaf-wise NOT of a mask."""
  return jax.tree.map(lambda m: (not m) if isinstance(m, bool) else ~m, mask)


def kernels(tree: PyTree) -> PyTree:
  """Leaf mask of weight tensors: leaves named `kernel` (linen and NNX conv/dense weights)."""
  return map_with_path(lambda path, _: path.rsplit("/", 1)[-1] == "kernel", tree)


def layer_order(model: nn.Module, *args, depth: int | None = 1, **kwargs) -> list[str]:
  """Bottom-up order of the model's parametrized units, by first call in the forward pass.

  Traces `model.init(*args, **kwargs)` abstractly (`jax.eval_shape`: no compiled work) while
  intercepting every module method call, so the order is that of the forward pass, not of names
  (`Block_10` comes after `Block_9`; a module constructed first but called second comes second).

  Args:
    model: any linen Module.
    *args: positional arguments of `model.init`, starting with its PRNG key(s).
    depth: 1 gives top-level submodules (e.g. ResNet blocks and the head); k gives module paths
      truncated to k components; None gives the leaf modules (those owning variables directly).
    **kwargs: keyword arguments of `model.init` (e.g. `train=False`).

  Returns:
    `/`-joined module paths (no collection name), each owning at least one variable, bottom-up.
  """
  if depth is not None and depth < 1:
    raise ValueError(f"layer_order: depth must be None or >= 1, got {depth}")
  first_calls: dict[tuple[str, ...], int] = {}

  def record(next_fun, call_args, call_kwargs, context):
    first_calls.setdefault(tuple(context.module.path), len(first_calls))
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    abstract = jax.eval_shape(lambda: model.init(*args, **kwargs))

  owners = []
  for path in paths(abstract):
    module_path = tuple(path.split("/")[1:-1])  # drop the collection and the variable name
    if not module_path:
      continue  # a variable of the root module itself belongs to no unit
    unit = module_path if depth is None else module_path[:depth]
    if unit not in owners:
      owners.append(unit)
  never_called = len(first_calls)
  owners.sort(key=lambda unit: first_calls.get(unit, never_called))
  return ["/".join(unit) for unit in owners]

