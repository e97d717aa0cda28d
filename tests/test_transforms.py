"""Tests of reinit.transforms: exact values, norms, fractions, optimizer states, jit/pmap/sharding."""

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reinit
from reinit.models import get_model


class Nested(nn.Module):
  """Third-party-style: nested modules, conv + BN pairs and a shortcut projection."""

  @nn.compact
  def __call__(self, x, train=False):
    y = nn.Conv(8, (3, 3), name="Conv_0")(x)
    y = nn.BatchNorm(use_running_average=not train, name="BatchNorm_0")(y)
    shortcut = nn.Conv(8, (1, 1), use_bias=False, name="conv_proj")(x)
    shortcut = nn.BatchNorm(use_running_average=not train, name="norm_proj")(shortcut)
    x = nn.relu(y + shortcut)
    return nn.Dense(3, name="head")(x.mean((1, 2)))


def _init(model, seed, shape=(2, 8, 8, 1)):
  return model.init(jax.random.key(seed), jnp.zeros(shape))


@pytest.fixture(scope="module")
def cnn():
  model = get_model("simple_cnn", num_classes=10, width=0.25)
  return model, _init(model, 0), _init(model, 1)


def _pairs(tree, other):
  return zip(reinit.paths(tree), jax.tree.leaves(tree), jax.tree.leaves(other))


# ------------------------------------------------------------------ reinitialize


@pytest.mark.parametrize("jit", [False, True])
def test_reinitialize_exact_fresh_and_untouched(cnn, jit):
  _, variables, fresh = cnn
  mask = reinit.select(variables, layers=["block4", "block5", "head"])
  fn = jax.jit(reinit.reinitialize) if jit else reinit.reinitialize
  out = fn(variables, fresh, mask)
  for (path, new, old), m, f in zip(_pairs(out, variables), jax.tree.leaves(mask),
                                    jax.tree.leaves(fresh)):
    expected = f if m else old
    assert new.dtype == old.dtype and new.shape == old.shape
    np.testing.assert_array_equal(np.asarray(new), np.asarray(expected), err_msg=path)


def test_reinitialize_element_mask_and_dtype():
  tree = {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)}
  fresh = {"w": -jnp.ones((2, 3), jnp.float32)}
  mask = {"w": jnp.array([[True, False, True], [False, False, True]])}
  out = jax.jit(reinit.reinitialize)(tree, fresh, mask)
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out["w"], np.float32),
                                [[-1, 1, -1], [3, 4, -1]])


# ------------------------------------------------------------------ rescale


def test_rescale_norms_zero_refs_and_untouched(cnn):
  _, variables, fresh = cnn
  trained = jax.tree.map(lambda x: 3.0 * x + 0.5, variables)
  mask = reinit.select(trained, layers=["block0", "block1"])
  out = jax.jit(reinit.rescale)(trained, variables, mask)
  for (path, new, old), ref, m in zip(_pairs(out, trained), jax.tree.leaves(variables),
                                      jax.tree.leaves(mask)):
    if not m:
      np.testing.assert_array_equal(new, old, err_msg=path)
    elif np.linalg.norm(ref) <= 1e-6:
      np.testing.assert_array_equal(new, np.zeros_like(old), err_msg=path)
    else:
      np.testing.assert_allclose(np.linalg.norm(new), np.linalg.norm(ref), rtol=1e-5,
                                 err_msg=path)
      # Direction is kept: a positive multiple of the old leaf.
      np.testing.assert_allclose(new / np.linalg.norm(new), old / np.linalg.norm(old),
                                 rtol=1e-4, atol=1e-6)


def test_rescale_takes_scalar_norms_and_element_masks():
  tree = {"a": jnp.array([3.0, 4.0, 12.0]), "b": jnp.array([1.0, 1.0])}
  norms = {"a": jnp.float32(10.0), "b": jnp.float32(0.0)}
  out = reinit.rescale(tree, norms, {"a": True, "b": True})
  np.testing.assert_allclose(np.linalg.norm(out["a"]), 10.0, rtol=1e-6)
  np.testing.assert_array_equal(out["b"], [0.0, 0.0])
  element = {"a": jnp.array([True, True, False]), "b": False}
  out = reinit.rescale(tree, {"a": jnp.array([0.6, 0.8, 99.0]), "b": tree["b"]}, element)
  np.testing.assert_allclose(out["a"], [0.6, 0.8, 12.0], rtol=1e-6)
  assert out["b"] is tree["b"]


# ------------------------------------------------------------------ shrink and perturb


def test_shrink_perturb_formula(cnn):
  _, variables, fresh = cnn
  out = jax.jit(lambda t, f: reinit.shrink_perturb(t, f, shrink=0.4, perturb=0.1))(
      variables, fresh)
  for (path, new, old), f in zip(_pairs(out, variables), jax.tree.leaves(fresh)):
    np.testing.assert_allclose(new, 0.4 * np.asarray(old) + 0.1 * np.asarray(f), rtol=1e-6,
                               atol=1e-7, err_msg=path)
  mask = reinit.select(variables, layers=["head"])
  out = reinit.shrink_perturb(variables, fresh, shrink=0.4, perturb=0.1, mask=mask)
  for (path, new, old), m in zip(_pairs(out, variables), jax.tree.leaves(mask)):
    if not m:
      assert new is old, path


# ------------------------------------------------------------------ masks


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_random_mask_weight_fractions_are_exact(cnn, fraction):
  _, variables, _ = cnn
  mask = reinit.random_mask(jax.random.key(3), variables["params"], fraction=fraction)
  for path, m, x in zip(reinit.paths(variables["params"]), jax.tree.leaves(mask),
                        jax.tree.leaves(variables["params"])):
    if path.endswith("kernel"):
      assert m.shape == x.shape and m.dtype == jnp.bool_
      assert int(m.sum()) == round(fraction * x.size), path
    else:
      assert m is False, path


def test_random_mask_depends_on_key_only(cnn):
  _, variables, _ = cnn
  a = reinit.random_mask(jax.random.key(1), variables, fraction=0.5)
  b = jax.jit(lambda k: reinit.random_mask(k, variables, fraction=0.5))(jax.random.key(1))
  c = reinit.random_mask(jax.random.key(2), variables, fraction=0.5)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_random_mask_filter_selects_units_and_their_bn_entries():
  variables = _init(Nested(), 0)
  mask = reinit.random_mask(jax.random.key(0), variables, fraction=0.25, granularity="filter")
  kernel = np.asarray(mask["params"]["Conv_0"]["kernel"])
  channels = kernel[0, 0, 0]
  assert channels.sum() == 2  # round(0.25 * 8) whole output channels
  assert (kernel == channels).all()  # the same channels at every spatial position and input
  for entry in (mask["params"]["Conv_0"]["bias"], mask["params"]["BatchNorm_0"]["scale"],
                mask["params"]["BatchNorm_0"]["bias"], mask["batch_stats"]["BatchNorm_0"]["mean"],
                mask["batch_stats"]["BatchNorm_0"]["var"]):
    np.testing.assert_array_equal(entry, channels)
  proj = np.asarray(mask["params"]["conv_proj"]["kernel"])[0, 0, 0]
  np.testing.assert_array_equal(mask["params"]["norm_proj"]["scale"], proj)
  np.testing.assert_array_equal(mask["batch_stats"]["norm_proj"]["var"], proj)
  head = np.asarray(mask["params"]["head"]["kernel"])[0]
  np.testing.assert_array_equal(mask["params"]["head"]["bias"], head)


def test_random_mask_rejects_bad_arguments(cnn):
  with pytest.raises(ValueError, match="fraction"):
    reinit.random_mask(jax.random.key(0), cnn[1], fraction=1.5)
  with pytest.raises(ValueError, match="granularity"):
    reinit.random_mask(jax.random.key(0), cnn[1], fraction=0.5, granularity="kernel")


def test_magnitude_mask_selects_smallest(cnn):
  _, variables, _ = cnn
  params = variables["params"]
  mask = reinit.magnitude_mask(params, sparsity=0.3)
  for path, m, x in zip(reinit.paths(params), jax.tree.leaves(mask), jax.tree.leaves(params)):
    if m is False:
      assert not path.endswith("kernel")
      continue
    x, m = np.abs(np.asarray(x)), np.asarray(m)
    assert m.sum() == round(0.3 * x.size), path
    assert x[m].max() <= x[~m].min(), path
  ties = reinit.magnitude_mask({"w": jnp.array([2.0, -1.0, 1.0, 0.5])}, sparsity=0.5,
                               within={"w": True})
  np.testing.assert_array_equal(ties["w"], [False, True, False, True])


# ------------------------------------------------------------------ optimizer states


def _stepped(tx, params):
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):
    _, state = tx.update(grads, state, params)
  return state


OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-3),
    "chain_masked_inject": lambda: optax.chain(
        optax.add_decayed_weights(1e-4, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)),
    "masked_adam": lambda: optax.masked(
        optax.adam(1e-3), lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    "inject_adamw": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("mask_over", ["params", "variables"])
def test_reset_opt_state_zeroes_masked_parts_only(cnn, name, mask_over):
  _, variables, _ = cnn
  params = variables["params"]
  state = _stepped(OPTIMIZERS[name](), params)
  mask = reinit.select(variables if mask_over == "variables" else params, layers=["head"])
  out = jax.jit(reinit.reset_opt_state)(state, mask)
  assert jax.tree.structure(out) == jax.tree.structure(state)
  touched = 0
  for (path, new, old) in _pairs(out, state):
    parts = path.split("/")
    if "head" in parts and new.ndim > 0:
      np.testing.assert_array_equal(new, np.zeros_like(old), err_msg=path)
      touched += 1
    else:
      np.testing.assert_array_equal(new, old, err_msg=path)  # counters, hyperparams, others
  assert touched >= 1


def test_reset_opt_state_element_mask():
  params = {"w": jnp.ones((2, 2))}
  state = _stepped(optax.sgd(0.1, momentum=0.9), params)
  out = reinit.reset_opt_state(state, {"w": jnp.array([[True, False], [False, True]])})
  trace = np.asarray(out[0].trace["w"])
  assert trace[0, 0] == 0 and trace[1, 1] == 0 and trace[0, 1] != 0 and trace[1, 0] != 0


# ------------------------------------------------------------------ pmap and sharding


def test_transforms_inside_pmap(cnn):
  _, variables, fresh = cnn
  n = jax.local_device_count()
  assert n == 8, "conftest sets 8 CPU devices"
  mask = reinit.select(variables, layers=["head"])
  stack = lambda t: jax.tree.map(lambda x: jnp.stack([x] * n), t)

  def per_device(tree, fresh_tree):
    tree = reinit.reinitialize(tree, fresh_tree, mask)
    return reinit.shrink_perturb(tree, fresh_tree, shrink=0.5, perturb=0.5,
                                 mask=reinit.select(tree, layers=["block0"]))
  out = jax.pmap(per_device)(stack(variables), stack(fresh))
  expected = per_device(variables, fresh)
  for (path, got, _), want in zip(_pairs(out, out), jax.tree.leaves(expected)):
    for d in range(n):
      np.testing.assert_array_equal(got[d], want, err_msg=path)


def test_shardings_preserved_on_8_device_mesh(cnn):
  model, variables, fresh = cnn
  mesh = jax.make_mesh((8,), ("data",))

  def place(tree):
    # Shard every leaf whose first axis divides by 8, replicate the rest.
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(
        mesh, P("data") if x.ndim and x.shape[0] % 8 == 0 else P())), tree)
  tree, fresh = place(variables), place(fresh)
  mask = reinit.select(tree, layers=["block2", "head"])
  element = reinit.random_mask(jax.random.key(0), tree, fraction=0.5)
  results = {
      "reinitialize": jax.jit(reinit.reinitialize)(tree, fresh, mask),
      "reinitialize_element": jax.jit(reinit.reinitialize)(tree, fresh, element),
      "rescale": jax.jit(reinit.rescale)(tree, fresh, mask),
      "shrink_perturb": jax.jit(lambda t, f: reinit.shrink_perturb(t, f, shrink=0.5,
                                                                    perturb=0.1))(tree, fresh),
  }
  for name, out in results.items():
    for (path, got, want) in _pairs(out, tree):
      assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (name, path)
      assert got.dtype == want.dtype and got.shape == want.shape
  params = tree["params"]
  opt_state = jax.device_put(_stepped(optax.sgd(0.1, momentum=0.9), variables["params"]),
                             NamedSharding(mesh, P()))
  out = jax.jit(reinit.reset_opt_state)(opt_state, reinit.select(params, layers=["head"]))
  for (path, got, want) in _pairs(out, opt_state):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim), path


def test_random_mask_filter_pairs_resnet_names():
  model = get_model("resnet18", num_classes=10, width=0.125)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  mask = reinit.random_mask(jax.random.key(0), shapes, fraction=0.5, granularity="filter")
  params, stats = mask["params"], mask["batch_stats"]
  for block, conv, bn in (("block0", "conv1", "bn1"), ("block0", "conv2", "bn2"),
                          ("block2", "shortcut_conv", "shortcut_bn"), ("stem", "conv", "bn")):
    channels = np.asarray(params[block][conv]["kernel"])[0, 0, 0]
    assert channels.sum() == round(0.5 * channels.size)
    for entry in (params[block][bn]["scale"], params[block][bn]["bias"],
                  stats[block][bn]["mean"], stats[block][bn]["var"]):
      np.testing.assert_array_equal(entry, channels, err_msg=f"{block}/{bn}")
  # conv1's channels are not conv2's: each conv pairs with its own BatchNorm only.
  assert not np.array_equal(np.asarray(params["block0"]["conv1"]["kernel"])[0, 0, 0],
                            np.asarray(params["block0"]["bn2"]["scale"]))
