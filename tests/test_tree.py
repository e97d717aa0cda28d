"""Tests of reinit.tree: paths, select, layer_order (ours, third-party-style linen, NNX)."""

import subprocess
import sys

import flax.linen as nn
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

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  _, fresh = nnx.split(Net(nnx.Rngs(1)))
  assert "head/kernel" in reinit.paths(state)
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
