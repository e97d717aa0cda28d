"""Tests of reinit.tree: paths, select, layer_order (ours, third-party-style linen, NNX)."""

import collections
import subprocess
import sys

import flax.linen as nn
import flax
from flax import nnx
import jax
import jax.numpy as jnp
import pytest

import reinit
from reinit.models import get_model


class ThirdPartyNet(nn.Module):
  """A nested model as someone else would write it: setup-defined and compact submodules,
  a module constructed before another but called after it, and more than ten blocks."""

  @nn.compact
  def __call__(self, x):
    late = nn.Dense(4, name="late")  # constructed first ...
    x = nn.Dense(4, name="early")(x)  # ... called second
    x = late(x)
    for _ in range(12):
      x = Residual()(x)
    return nn.Dense(2, name="out")(x)


class Residual(nn.Module):

  def setup(self):
    self.inner = nn.Dense(4)
    self.norm = nn.LayerNorm()

  def __call__(self, x):
    return x + self.norm(self.inner(x))


class AutoBlock(nn.Module):
  """A block as a third-party linen model writes it: auto-named `Conv_0` and `BatchNorm_0`."""

  @nn.compact
  def __call__(self, x, train=False):
    y = nn.Conv(2, (3, 3))(x)
    return x + nn.BatchNorm(use_running_average=not train)(y)


class AutoNet(nn.Module):
  """Auto-names only: a top-level `Conv_0`/`BatchNorm_0` and blocks holding their own."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.BatchNorm(use_running_average=not train)(nn.Conv(2, (3, 3))(x))
    for _ in range(2):
      x = AutoBlock()(x, train)
    return nn.Dense(3)(x.mean((1, 2)))


@pytest.fixture(scope="module")
def auto_variables():
  return AutoNet().init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


def _chosen(tree, mask):
  return [p for p, m in zip(reinit.paths(tree), jax.tree.leaves(mask)) if m]


@pytest.fixture(scope="module")
def cnn_variables():
  model = get_model("simple_cnn", num_classes=10, width=0.25)
  return model, model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))


def test_layer_order_simple_cnn_is_bottom_up(cnn_variables):
  model, _ = cnn_variables
  order = reinit.layer_order(model, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  assert order == [f"block{i}" for i in range(6)] + ["head"]


def test_layer_order_follows_calls_not_names():
  order = reinit.layer_order(ThirdPartyNet(), jax.random.key(0), jnp.zeros((1, 3)))
  assert order == (["early", "late"] + [f"Residual_{i}" for i in range(12)] + ["out"])
  leaves = reinit.layer_order(ThirdPartyNet(), jax.random.key(0), jnp.zeros((1, 3)), depth=None)
  assert leaves[:4] == ["early", "late", "Residual_0/inner", "Residual_0/norm"]
  assert leaves[-1] == "out" and len(leaves) == 2 + 24 + 1


def test_layer_order_depth_none_on_cnn_lists_leaf_modules(cnn_variables):
  model, _ = cnn_variables
  leaves = reinit.layer_order(model, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), depth=None)
  assert leaves[:3] == ["block0/Conv_0", "block0/BatchNorm_0", "block0/Standardize_0"]
  assert leaves[-1] == "head"


class KeywordNet(nn.Module):
  """Root-module variables, and a unit that only a keyword argument of `init` calls."""

  @nn.compact
  def __call__(self, x, *, extra):
    offset = self.param("bias", nn.initializers.zeros, (4,))  # owned by no unit; sorts first
    inner = nn.Dense(4, name="inner")  # constructed first, called last
    x = nn.Dense(4, name="first")(x)
    if extra:
      x = Residual(name="extra")(x)
    return inner(x) + offset


def test_layer_order_keyword_arguments_and_root_variables():
  key, x = jax.random.key(0), jnp.zeros((1, 3))
  assert reinit.layer_order(KeywordNet(), key, x, extra=False) == ["first", "inner"]
  assert reinit.layer_order(KeywordNet(), key, x, extra=True) == ["first", "extra", "inner"]
  assert reinit.layer_order(KeywordNet(), key, x, extra=True, depth=None) == [
      "first", "extra/inner", "extra/norm", "inner"]
  assert reinit.layer_order(KeywordNet(), key, x, extra=True, depth=2) == [
      "first", "extra/inner", "extra/norm", "inner"]
  variables = KeywordNet().init(key, x, extra=False)
  assert reinit.paths(variables)[0] == "params/bias"


def test_layer_order_rejects_bad_depth(cnn_variables):
  with pytest.raises(ValueError, match="depth"):
    reinit.layer_order(cnn_variables[0], jax.random.key(0), jnp.zeros((1, 8, 8, 1)), depth=0)


def test_paths_in_leaf_order(cnn_variables):
  _, variables = cnn_variables
  got = reinit.paths(variables)
  assert len(got) == len(jax.tree.leaves(variables))
  assert "params/block3/Conv_0/kernel" in got
  assert "batch_stats/block0/BatchNorm_0/mean" in got
  assert "norm/block5/Standardize_0/active" in got
  assert got == sorted(got, key=got.index)  # a list in tree order, no duplicates
  assert len(set(got)) == len(got)


def test_select_reads_variables_and_bare_params_alike(cnn_variables):
  _, variables = cnn_variables
  on_vars = reinit.select(variables, layers=["block1"])
  on_params = reinit.select(variables["params"], layers=["block1"])
  assert on_params == on_vars["params"]
  chosen = [p for p, m in zip(reinit.paths(variables), jax.tree.leaves(on_vars)) if m]
  assert chosen and all(p.split("/")[1] == "block1" for p in chosen)
  assert {p.split("/")[0] for p in chosen} == {"params", "batch_stats", "norm"}
  # 'block1' must not pick 'block10'-style prefixes: it is a path component match.
  assert not any(p.split("/")[1].startswith("block1") and p.split("/")[1] != "block1"
                 for p in chosen)


def test_select_top_level_auto_name_does_not_pick_nested_namesakes(auto_variables):
  variables = auto_variables
  params = variables["params"]
  assert _chosen(params, reinit.select(params, layers=["Conv_0"])) == [
      "Conv_0/bias", "Conv_0/kernel"]
  assert _chosen(variables, reinit.select(variables, layers=["Conv_0"])) == [
      "params/Conv_0/bias", "params/Conv_0/kernel"]
  assert _chosen(variables, reinit.select(variables, layers=["BatchNorm_0"])) == [
      "batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var",
      "params/BatchNorm_0/bias", "params/BatchNorm_0/scale"]
  assert _chosen(params, reinit.select(params, layers=["AutoBlock_1/Conv_0"])) == [
      "AutoBlock_1/Conv_0/bias", "AutoBlock_1/Conv_0/kernel"]
  # A bare params tree has no collection to drop: 'params/...' names nothing in it.
  with pytest.raises(ValueError, match="Conv_0"):
    reinit.select(params, layers=["params/Conv_0"])
  with pytest.raises(ValueError, match=r"known top-level units: \['AutoBlock_0', 'AutoBlock_1', "
                     r"'BatchNorm_0', 'Conv_0', 'Dense_0'\]"):
    reinit.select(variables, layers=["Conv_9"])


def test_has_collections_decides_once_per_tree(auto_variables):
  assert reinit.tree.has_collections(auto_variables)
  assert reinit.tree.has_collections(flax.core.freeze(auto_variables))
  for name in ("params", "batch_stats", "cache", "intermediates", "losses"):
    assert reinit.tree.has_collections({name: {}, "norm": {}}), name  # e.g. mutable updates
  assert not reinit.tree.has_collections(auto_variables["params"])
  assert not reinit.tree.has_collections({"norm": {"scale": jnp.ones(2)}})  # a module 'norm'
  assert not reinit.tree.has_collections([{"params": 1}])


def test_paths_and_select_on_list_and_tuple_trees():
  tree = {"a": [jnp.zeros(1), (jnp.zeros(2), {"b": jnp.zeros(3)})], "c": (jnp.zeros(4),)}
  assert reinit.paths(tree) == ["a/0", "a/1/0", "a/1/1/b", "c/0"]
  assert _chosen(tree, reinit.select(tree, layers=["a/1"])) == ["a/1/0", "a/1/1/b"]
  assert _chosen(tree, reinit.select(tree, layers=["c"], include=[r"a/\d"])) == ["a/0", "c/0"]
  assert reinit.paths((jnp.zeros(1), [jnp.zeros(1)])) == ["0", "1/0"]
  # A lone array has the empty path: no layer names it.
  assert reinit.paths(jnp.zeros(3)) == [""]
  # Only NNX's trailing `.value` is dropped, never a lone attribute of that name.
  box = collections.namedtuple("Box", "value")(jnp.zeros(1))
  assert reinit.paths(box) == ["value"]
  assert reinit.paths({"a": box}) == ["a"]


def test_map_with_path_passes_is_leaf_through():
  tree = {"a": (jnp.zeros(2), jnp.ones(3)), "b": jnp.zeros(1)}
  out = reinit.tree.map_with_path(lambda path, x: (path, len(x)), tree,
                                  is_leaf=lambda x: isinstance(x, tuple))
  assert out == {"a": ("a", 2), "b": ("b", 1)}


def test_select_rejects_a_string_for_a_sequence(auto_variables):
  for kwargs in ({"layers": "Conv_0"}, {"include": "Conv_0/.*"}, {"exclude": ".*bias"}):
    with pytest.raises(TypeError, match="^select: layers, include and exclude take sequences "
                       "of strings, not a str$"):
      reinit.select(auto_variables, **kwargs)


def test_select_include_exclude_and_errors(cnn_variables):
  _, variables = cnn_variables
  mask = reinit.select(variables, include=[r"params/.*/kernel"], exclude=[r".*/head/.*"])
  chosen = [p for p, m in zip(reinit.paths(variables), jax.tree.leaves(mask)) if m]
  assert chosen == [f"params/block{i}/Conv_0/kernel" for i in range(6)]
  mask = reinit.select(variables, layers=["head"], exclude=[r".*bias"])
  chosen = [p for p, m in zip(reinit.paths(variables), jax.tree.leaves(mask)) if m]
  assert chosen == ["params/head/kernel"]
  with pytest.raises(ValueError, match="block9"):
    reinit.select(variables, layers=["block9", "head"])
  assert all(m is False for m in jax.tree.leaves(reinit.select(variables)))


def test_select_full_path_layer(cnn_variables):
  _, variables = cnn_variables
  mask = reinit.select(variables, layers=["params/block2/Conv_0"])
  chosen = [p for p, m in zip(reinit.paths(variables), jax.tree.leaves(mask)) if m]
  assert chosen == ["params/block2/Conv_0/kernel"]


def test_nnx_state_goes_through_select_and_reinitialize():
  class Net(nnx.Module):

    def __init__(self, rngs):
      self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
      self.head = nnx.Linear(4, 2, rngs=rngs)
      self.scale = nnx.Param(jnp.ones(()))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  _, fresh = nnx.split(Net(nnx.Rngs(1)))
  assert "head/kernel" in reinit.paths(state)
  assert "scale" in reinit.paths(state)  # a Param owned by the root module itself
  mask = reinit.select(state, layers=["head"])
  out = reinit.reinitialize(state, fresh, mask)
  model = nnx.merge(graphdef, out)
  fresh_model = nnx.merge(graphdef, fresh)
  original = nnx.merge(graphdef, state)
  assert (model.head.kernel[...] == fresh_model.head.kernel[...]).all()
  assert (model.conv.kernel[...] == original.conv.kernel[...]).all()
  assert not (model.conv.kernel[...] == fresh_model.conv.kernel[...]).all()


def test_import_reinit_is_light():
  code = ("import sys, reinit; heavy = [m for m in ('tensorflow', 'tensorflow_datasets', "
          "'orbax', 'clu') if m in sys.modules]; assert not heavy, heavy")
  subprocess.run([sys.executable, "-c", code], check=True)
