"""Paths, selection and layer order over pytrees of arrays.

A *path* is the `/`-joined key path of a leaf, e.g. `params/block3/Conv_0/kernel`. A *mask* is a
pytree with the structure of the tree it describes whose leaves are Python bools (whole leaf) or
bool arrays of the leaf's shape (element-wise); True means "touched".

Only jax, flax and numpy are imported here: this module is the library core.
"""

from collections.abc import Mapping
from collections.abc import Sequence
import re
from typing import Any

import flax.linen as nn
import jax

PyTree = Any

# Flax NNX `State` leaves carry their array under `.value`; it names no unit, so it is dropped.
_NNX_VALUE_KEY = "value"


def key_path_to_str(key_path) -> str:
  """`(DictKey('params'), DictKey('head'), DictKey('kernel'))` -> `'params/head/kernel'`.

  Dict keys, attribute names and sequence indices are written bare (`jax.tree_util.keystr`'s
  simple form), so `{'a': [x, (y,)]}` has paths `a/0` and `a/1/0`. This wrapper only drops an
  NNX `State` leaf's trailing `.value`, so NNX and linen trees name a unit's leaves alike.
  """
  key_path = tuple(key_path)
  if (len(key_path) > 1 and isinstance(key_path[-1], jax.tree_util.GetAttrKey)
      and key_path[-1].name == _NNX_VALUE_KEY):
    key_path = key_path[:-1]
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


def paths(tree: PyTree) -> list[str]:
  """Leaf paths of `tree`, in `jax.tree.leaves` order."""
  with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [key_path_to_str(kp) for kp, _ in with_path]


def map_with_path(fn, tree: PyTree, *rest: PyTree, is_leaf=None) -> PyTree:
  """`jax.tree.map` where `fn(path, leaf, *rest_leaves)` also receives the leaf's path string."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, *leaves: fn(key_path_to_str(kp), *leaves), tree, *rest, is_leaf=is_leaf)


# Collection names flax itself writes into linen `variables`. A module can be given one of these
# names too, but none of them names a unit in any model we know of.
_FLAX_COLLECTIONS = frozenset({"params", "batch_stats", "cache", "intermediates", "losses"})


def has_collections(tree: PyTree) -> bool:
  """Whether the first component of `tree`'s paths names a collection (linen `variables`).

  True for a mapping with at least one of flax's collection names among its top-level keys
  (`params`, `batch_stats`, `cache`, `intermediates`, `losses`; other collections, such as a
  model's own `norm`, may sit beside them). False for a bare `params` tree, an NNX `State` or any
  other pytree, whose first path component names a module.
  """
  return isinstance(tree, Mapping) and any(key in _FLAX_COLLECTIONS for key in tree.keys())


def _path_views(path: str, collection_first: bool) -> tuple[str, ...]:
  """The path as written, and, in a `variables` tree, without its collection name."""
  if not collection_first:
    return (path,)
  head, sep, tail = path.partition("/")
  return (path, tail) if sep else (path,)


def _under(path: str, layer: str) -> bool:
  return path == layer or path.startswith(layer + "/")


def select(tree: PyTree, *, layers: Sequence[str] = (), include: Sequence[str] = (),
           exclude: Sequence[str] = ()) -> PyTree:
  """Leaf-level mask (Python bools) of the leaves under `layers` or matching `include`.

  A leaf is selected when its module path equals or starts with `layer + '/'` for one of
  `layers`, or when its full path full-matches a regex in `include`. Leaves whose full path
  full-matches a regex in `exclude` are then removed. Whether the first path component is a
  collection name is decided once for the whole tree (`has_collections`): in a `variables` tree
  the module path is the path without its collection (a layer may also be given with it, e.g.
  `params/head`); in a bare `params` tree or an NNX `State` it is the full path. So `Conv_0`
  selects the top-level `Conv_0` only, never `Block_0/Conv_0`, whichever tree is given.

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
  collection_first = has_collections(tree)
  views = [_path_views(p, collection_first) for p in paths(tree)]
  unknown = [layer for layer in layers
             if not any(_under(view, layer) for leaf_views in views for view in leaf_views)]
  if unknown:
    raise ValueError(f"select: unknown layers {unknown}; known top-level units: "
                     f"{sorted({leaf_views[-1].split('/')[0] for leaf_views in views})}")

  def is_selected(path: str) -> bool:
    chosen = (any(_under(view, layer) for layer in layers
                  for view in _path_views(path, collection_first))
              or any(r.fullmatch(path) for r in include_res))
    return chosen and not any(r.fullmatch(path) for r in exclude_res)

  return map_with_path(lambda path, _: is_selected(path), tree)


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

