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


def test_reinitialize_static_mask_keeps_low_precision_dtypes():
  tree = {"h": jnp.array([1.0, 2.0], jnp.float16), "b": jnp.array([3.0], jnp.bfloat16),
          "k": jnp.array([5.0], jnp.bfloat16)}
  fresh = {"h": jnp.array([0.5, 0.25]), "b": jnp.array([-2.0]), "k": jnp.array([7.0])}
  for fn in (reinit.reinitialize, jax.jit(reinit.reinitialize)):
    out = fn(tree, fresh, {"h": True, "b": True, "k": False})
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in tree.items()}
    np.testing.assert_array_equal(np.asarray(out["h"], np.float32), [0.5, 0.25])
    np.testing.assert_array_equal(np.asarray(out["b"], np.float32), [-2.0])
    np.testing.assert_array_equal(np.asarray(out["k"], np.float32), [5.0])
  # Host (numpy) leaves have no sharding to keep: the result is computed as it is.
  out = reinit.reinitialize({"n": np.array([1.0, 2.0], np.float32)}, {"n": jnp.array([3.0, 4.0])},
                            {"n": True})
  assert out["n"].dtype == np.float32
  np.testing.assert_array_equal(out["n"], [3.0, 4.0])


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


def test_rescale_small_norms_and_eps_boundary():
  tree = {"tiny": jnp.array([3e-9, 4e-9]),  # norm 5e-9, far below eps
          "zero": jnp.zeros(2),
          "at_eps": jnp.array([3.0, 4.0]),
          "above_eps": jnp.array([3.0, 4.0]),
          "half": jnp.array([3.0, 4.0], jnp.bfloat16)}
  reference = {"tiny": jnp.float32(1.0), "zero": jnp.float32(1.0), "at_eps": jnp.float32(1e-6),
               "above_eps": jnp.float32(2e-6), "half": jnp.array([0.0, 10.0])}
  out = reinit.rescale(tree, reference, jax.tree.map(lambda _: True, tree))
  # A tiny leaf is still brought to the reference norm: direction (0.6, 0.8), norm 1.
  np.testing.assert_allclose(out["tiny"], [0.6, 0.8], rtol=1e-5)
  np.testing.assert_array_equal(out["zero"], [0.0, 0.0])  # nothing to scale, and no NaN
  np.testing.assert_array_equal(out["at_eps"], [0.0, 0.0])  # reference norm <= eps: zero
  np.testing.assert_allclose(out["above_eps"], [1.2e-6, 1.6e-6], rtol=1e-5)
  assert out["half"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out["half"], np.float32), [6.0, 8.0])


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
  assert jax.tree.structure(out) == jax.tree.structure(variables)


def test_shrink_perturb_element_mask_dtypes_and_structure():
  tree = {"a": jnp.array([1.0, 2.0, 4.0], jnp.float16), "b": (jnp.array([8.0], jnp.bfloat16),)}
  fresh = {"a": jnp.array([10.0, 20.0, 40.0]), "b": (jnp.array([100.0]),)}
  mask = {"a": jnp.array([True, False, True]), "b": (True,)}
  for fn in (reinit.shrink_perturb, jax.jit(reinit.shrink_perturb, static_argnames=(
      "shrink", "perturb"))):
    out = fn(tree, fresh, shrink=0.5, perturb=0.25, mask=mask)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    assert out["a"].dtype == jnp.float16 and out["b"][0].dtype == jnp.bfloat16
    # 0.5 * p + 0.25 * f where masked, p elsewhere (all exact in f16/bf16).
    np.testing.assert_array_equal(np.asarray(out["a"], np.float32), [3.0, 2.0, 12.0])
    np.testing.assert_array_equal(np.asarray(out["b"][0], np.float32), [29.0])


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


def test_random_mask_filter_on_bare_params_and_narrowed_within():
  params = _init(Nested(), 0)["params"]
  within = reinit.select(params, layers=["Conv_0"], exclude=[".*bias"])
  mask = reinit.random_mask(jax.random.key(0), params, fraction=0.5, granularity="filter",
                            within=within)
  channels = np.asarray(mask["Conv_0"]["kernel"])[0, 0, 0]
  assert channels.sum() == 4 and (np.asarray(mask["Conv_0"]["kernel"]) == channels).all()
  for entry in (mask["Conv_0"]["bias"], mask["BatchNorm_0"]["scale"],
                mask["BatchNorm_0"]["bias"]):
    np.testing.assert_array_equal(entry, channels)
  assert mask["conv_proj"]["kernel"] is False and mask["norm_proj"]["scale"] is False
  assert mask["head"]["kernel"] is False and mask["head"]["bias"] is False
  # A 1-D leaf drawn on its own is its own channels and pairs with nothing; a 0-d leaf is one.
  tree = {"b": jnp.zeros(4), "k": jnp.zeros((2, 4)), "s": jnp.zeros(())}
  mask = reinit.random_mask(jax.random.key(1), tree, fraction=0.5, granularity="filter",
                            within={"b": True, "k": False, "s": True})
  assert mask["b"].shape == (4,) and int(mask["b"].sum()) == 2 and mask["k"] is False
  assert mask["s"].shape == () and mask["s"].dtype == jnp.bool_
  full = reinit.random_mask(jax.random.key(1), tree, fraction=1.0, granularity="filter",
                            within={"b": False, "k": False, "s": True})
  assert bool(full["s"]) and full["b"] is False


def test_random_mask_rejects_bad_arguments(cnn):
  with pytest.raises(ValueError, match="fraction"):
    reinit.random_mask(jax.random.key(0), cnn[1], fraction=1.5)
  with pytest.raises(ValueError, match="granularity"):
    reinit.random_mask(jax.random.key(0), cnn[1], fraction=0.5, granularity="kernel")
  for sparsity in (-0.1, 1.1):
    with pytest.raises(ValueError, match=r"magnitude_mask: sparsity=.* is invalid; accepted: "
                                         r"a fraction in \[0, 1\]"):
      reinit.magnitude_mask({"w": jnp.ones(2)}, sparsity=sparsity)


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


@pytest.fixture(scope="module")
def nested_variables():
  return _init(Nested(), 0)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("mask_over", ["params", "variables"])
def test_reset_opt_state_zeroes_masked_parts_only(nested_variables, name, mask_over, jit):
  variables = nested_variables
  params = variables["params"]
  state = _stepped(OPTIMIZERS[name](), params)
  mask = reinit.select(variables if mask_over == "variables" else params, layers=["head"])
  out = (jax.jit(reinit.reset_opt_state) if jit else reinit.reset_opt_state)(state, mask)
  assert jax.tree.structure(out) == jax.tree.structure(state)
  touched = 0
  for (path, new, old) in _pairs(out, state):
    if "head" in path.split("/"):
      np.testing.assert_array_equal(new, np.zeros_like(old), err_msg=path)
      touched += 1
    else:
      np.testing.assert_array_equal(new, old, err_msg=path)  # counters, hyperparams, others
      assert np.asarray(old).ndim == 0 or np.abs(np.asarray(old)).sum() > 0 or "nu" in path
  assert touched >= 2  # kernel and bias of every moment


def test_reset_opt_state_masked_optimizer_with_shapes():
  # optax.masked leaves MaskedNode placeholders in its moments; shapes must stay aligned with
  # the params' leaves around them.
  params = {"a": jnp.ones((2, 3)), "b": jnp.ones(3), "c": jnp.ones((4, 1))}
  tx = optax.masked(optax.adam(0.1), {"a": True, "b": False, "c": True})
  state = _stepped(tx, params)
  mask = {"a": False, "b": True, "c": True}
  for kwargs in ({"params": params}, {}):
    m = mask if kwargs else {"a": False, "b": jnp.ones(3, bool), "c": jnp.ones((4, 1), bool)}
    out = reinit.reset_opt_state(state, m, **kwargs)
    inner, old = out.inner_state[0], state.inner_state[0]
    np.testing.assert_array_equal(inner.mu["c"], np.zeros((4, 1)))
    np.testing.assert_array_equal(inner.nu["c"], np.zeros((4, 1)))
    np.testing.assert_array_equal(inner.mu["a"], old.mu["a"])
    assert isinstance(inner.mu["b"], optax.MaskedNode)
    assert int(inner.count) == 2


@pytest.mark.parametrize("make", [tuple, list])
def test_reset_opt_state_on_tuple_and_list_params(make):
  params = make([jnp.ones((2, 3)), jnp.ones(3)])
  for tx in (optax.adam(0.1), optax.sgd(0.1, momentum=0.9)):
    state = _stepped(tx, params)
    out = reinit.reset_opt_state(state, make([True, False]))
    for path, new, old in _pairs(out, state):
      if path.endswith("/0") and np.asarray(old).ndim == 2:
        np.testing.assert_array_equal(new, np.zeros((2, 3)), err_msg=path)
      else:
        np.testing.assert_array_equal(new, old, err_msg=path)


@pytest.mark.parametrize("jit", [False, True])
def test_reset_opt_state_single_array_keeps_the_step_count(jit):
  params = jnp.array([1.0, 2.0, 3.0])
  state = _stepped(optax.adam(0.1), params)
  assert int(state[0].count) == 2
  fn = jax.jit(reinit.reset_opt_state) if jit else reinit.reset_opt_state
  for mask, kwargs in ((jnp.ones(3, bool), {}), (True, {"params": params})):
    out = fn(state, mask, **kwargs)
    assert int(out[0].count) == 2
    np.testing.assert_array_equal(out[0].mu, np.zeros(3))
    np.testing.assert_array_equal(out[0].nu, np.zeros(3))
  # Nothing tells the moments of one array from its counters: refused, not guessed.
  message = (r"^reset_opt_state: a params tree of one array needs its shape \(pass params= or an "
             r"element mask\), and must not be a scalar: nothing else tells its moments from the "
             r"optimizer's scalar counters and hyperparameters")
  with pytest.raises(ValueError, match=message):
    fn(state, True)
  with pytest.raises(ValueError, match=message):
    reinit.reset_opt_state(_stepped(optax.adam(0.1), jnp.float32(1.0)), True,
                           params=jnp.float32(2.0))
  with pytest.raises(ValueError, match="^reset_opt_state: params must have the structure of "
                     "the params mask, got PyTreeDef"):
    reinit.reset_opt_state(state, {"w": True}, params={"w": params, "v": params})


def test_reset_opt_state_shapes_not_just_structure():
  # A dict of the params' keys whose shapes are not the params' is not a moment of them.
  params = {"a": jnp.ones((2, 2)), "b": jnp.ones(3)}
  other = {"a": jnp.full((5,), 7.0), "b": jnp.full((), 7.0)}
  state = (optax.TraceState(trace=jax.tree.map(lambda x: 2 * x, params)), other)
  element = {"a": jnp.ones((2, 2), bool), "b": jnp.ones(3, bool)}
  for mask, kwargs in ((element, {}), ({"a": True, "b": True}, {"params": params})):
    out = reinit.reset_opt_state(state, mask, **kwargs)
    np.testing.assert_array_equal(out[0].trace["a"], np.zeros((2, 2)))
    np.testing.assert_array_equal(out[0].trace["b"], np.zeros(3))
    np.testing.assert_array_equal(out[1]["a"], np.full((5,), 7.0))
    np.testing.assert_array_equal(out[1]["b"], 7.0)


def _sf_loss(p):
  return jnp.sum(jnp.square(p["w"] - 3.0)) + jnp.sum(jnp.square(p["b"] + 1.0))


@pytest.mark.parametrize("jit", [False, True])
def test_reset_opt_state_schedule_free_copy_takes_the_new_params(jit):
  tx = optax.contrib.schedule_free_sgd(0.1, b1=0.9)
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, 0.25, 2.0])}
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(jax.grad(_sf_loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  mask = {"w": True, "b": jnp.array([True, False, False])}
  new = reinit.reinitialize(params, {"w": jnp.array([7.0, 8.0]), "b": jnp.full(3, 9.0)}, mask)
  with pytest.raises(ValueError, match=r"ScheduleFreeState\.z.*params="):
    reinit.reset_opt_state(state, mask)
  fn = jax.jit(reinit.reset_opt_state) if jit else reinit.reset_opt_state
  out = fn(state, mask, params=new)
  # The copy z of a reset entry is its new value, untouched entries keep theirs ...
  np.testing.assert_array_equal(out.z["w"], [7.0, 8.0])
  np.testing.assert_array_equal(out.z["b"], [9.0, state.z["b"][1], state.z["b"][2]])
  # ... so a reset entry is evaluated at its new value (x = y = z), the others where they were.
  old_eval = optax.contrib.schedule_free_eval_params(state, params)
  new_eval = optax.contrib.schedule_free_eval_params(out, new)
  np.testing.assert_allclose(new_eval["w"], [7.0, 8.0], rtol=1e-6)
  np.testing.assert_allclose(new_eval["b"], [9.0, old_eval["b"][1], old_eval["b"][2]],
                             rtol=1e-6)
  for field in ("b1", "weight_sum", "step_count", "max_lr"):
    np.testing.assert_array_equal(getattr(out, field), getattr(state, field), err_msg=field)
  # The wrapped optimizer's momentum (schedule-free's own is z) is zeroed like any other.
  out = reinit.reset_opt_state(
      _stepped(optax.contrib.schedule_free(optax.sgd(0.1, momentum=0.5), 0.1), params),
      mask, params=new)
  trace = out.base_optimizer_state[0].trace
  np.testing.assert_array_equal(trace["w"], [0.0, 0.0])
  assert trace["b"][0] == 0 and (np.asarray(trace["b"][1:]) != 0).all()


COPY_HOLDERS = {  # optimizer -> the state field holding a copy of the parameters
    "schedule_free": (lambda: optax.contrib.schedule_free_sgd(0.1), "ScheduleFreeState", "z"),
    "mechanic": (lambda: optax.contrib.mechanize(optax.sgd(0.1)), "MechanicState", "x0"),
    "madgrad": (lambda: optax.contrib.madgrad(0.1), "MadgradState", "x0"),
    "prodigy": (lambda: optax.contrib.prodigy(0.1), "ProdigyState", "params0"),
    "dog": (lambda: optax.contrib.dog(0.1), "DoGState", "init_params"),
    "dowg": (lambda: optax.contrib.dowg(0.1), "DoWGState", "init_params"),
    "cocob": (lambda: optax.contrib.cocob(0.1), "COCOBState", "init_particles"),
}


@pytest.mark.parametrize("name", sorted(COPY_HOLDERS))
def test_reset_opt_state_sets_parameter_copies_to_the_new_params(name):
  make, state_type, field = COPY_HOLDERS[name]
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, 0.25, 2.0])}
  state = _stepped(make(), params)
  mask = {"w": True, "b": jnp.array([True, False, False])}
  new = {"w": jnp.array([7.0, 8.0], jnp.bfloat16), "b": jnp.full(3, 9.0, jnp.bfloat16)}
  with pytest.raises(ValueError, match=(
      rf"^reset_opt_state: {state_type}\.{field} holds a copy of the parameters; pass params= "
      r"\(the parameters after the reset\) to set its reset entries to them")):
    reinit.reset_opt_state(state, mask)
  out = reinit.reset_opt_state(state, mask, params=new)
  holder = [s for s in jax.tree.leaves(
      out, is_leaf=lambda s: type(s).__name__ == state_type) if type(s).__name__ == state_type]
  before = [s for s in jax.tree.leaves(
      state, is_leaf=lambda s: type(s).__name__ == state_type) if type(s).__name__ == state_type]
  copy, old = getattr(holder[0], field), getattr(before[0], field)
  assert copy["w"].dtype == old["w"].dtype  # the copy keeps its own dtype
  np.testing.assert_array_equal(copy["w"], [7.0, 8.0])
  np.testing.assert_array_equal(copy["b"], [9.0, old["b"][1], old["b"][2]])
  for path, got, want in _pairs(out, state):  # every other part: zeroed where reset, or kept
    if f"/{field}/" not in f"/{path}/" and np.shape(want) != np.shape(params["w"]):
      if np.shape(want) == (3,):
        np.testing.assert_array_equal(got[1:], want[1:], err_msg=path)
      else:
        np.testing.assert_array_equal(got, want, err_msg=path)


def test_reset_opt_state_lookahead_resets_the_fast_state():
  tx = optax.lookahead(optax.sgd(0.1, momentum=0.9), sync_period=2, slow_step_size=0.5)
  fast = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
  params = optax.LookaheadParams.init_synced(fast)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(jax.grad(_sf_loss)(params.fast), state, params)
    params = optax.apply_updates(params, updates)
  assert int(state.steps_since_sync) == 1
  fresh = optax.LookaheadParams.init_synced({"w": jnp.array([5.0, 6.0]), "b": jnp.array([4.0])})
  mask = optax.LookaheadParams(fast={"w": True, "b": False}, slow={"w": True, "b": False})
  new = reinit.reinitialize(params, fresh, mask)
  np.testing.assert_array_equal(new.slow["w"], [5.0, 6.0])  # the slow copy restarts with it
  np.testing.assert_array_equal(new.slow["b"], params.slow["b"])
  for m in (mask, mask.fast):
    out = reinit.reset_opt_state(state, m, params=new)
    assert int(out.steps_since_sync) == 1
    np.testing.assert_array_equal(out.fast_state[0].trace["w"], [0.0, 0.0])
    np.testing.assert_array_equal(out.fast_state[0].trace["b"], state.fast_state[0].trace["b"])
    assert (np.asarray(state.fast_state[0].trace["w"]) != 0).all()


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


def _sharded_problem(mesh, fresh_placement):
  """A tree sharded over 'data' (replicated where a leaf does not divide), and a `fresh` that is
  unsharded: on the default device, uncommitted, or committed replicated over the mesh."""
  def place(x):
    spec = P("data") if x.ndim and x.shape[0] % 8 == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))
  tree = jax.tree.map(place, {"k": jnp.arange(48.0).reshape(16, 3), "b": jnp.arange(8.0) + 1,
                              "s": jnp.float32(2.0), "h": jnp.ones(8, jnp.bfloat16)})
  fresh = {"k": -jnp.ones((16, 3)), "b": jnp.full(8, 0.5), "s": jnp.float32(-1.0),
           "h": jnp.full(8, 3.0)}
  if fresh_placement == "replicated":
    fresh = jax.device_put(fresh, NamedSharding(mesh, P()))
  elif fresh_placement == "host":
    fresh = jax.tree.map(np.asarray, fresh)
  return tree, fresh


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
@pytest.mark.parametrize("fresh_placement", ["default_device", "replicated", "host"])
@pytest.mark.parametrize("jit", [False, True])
def test_shardings_preserved_on_8_device_mesh(axis_type, fresh_placement, jit):
  axis = jax.sharding.AxisType.Explicit if axis_type == "explicit" else jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis,))
  tree, fresh = _sharded_problem(mesh, fresh_placement)
  static = {"k": True, "b": True, "s": True, "h": True}
  element = jax.tree.map(lambda x: jnp.arange(x.size).reshape(x.shape) % 2 == 0, fresh)
  fn = jax.jit if jit else (lambda f, **_: f)
  sp = fn(reinit.shrink_perturb, static_argnames=("shrink", "perturb"))
  results = {
      "reinitialize": fn(reinit.reinitialize)(tree, fresh, static),
      "reinitialize_element": fn(reinit.reinitialize)(tree, fresh, element),
      "rescale": fn(reinit.rescale)(tree, fresh, static),
      "rescale_element": fn(reinit.rescale)(tree, fresh, element),
      "shrink_perturb": sp(tree, fresh, shrink=0.5, perturb=0.1),
      "shrink_perturb_element": sp(tree, fresh, shrink=0.5, perturb=0.1, mask=element),
  }
  # Under jit with Auto axes the placement is XLA's (documented): values only.
  check_sharding = not (jit and axis_type == "auto")
  host_tree, host_fresh = jax.device_get((tree, fresh))
  expected = {
      "reinitialize": {**host_fresh, "h": host_fresh["h"].astype(jnp.bfloat16)},
      "reinitialize_element": jax.tree.map(np.where, element, host_fresh, host_tree),
      "shrink_perturb": jax.tree.map(lambda t, f: (0.5 * t.astype(np.float32) + 0.1 * f)
                                     .astype(t.dtype), host_tree, host_fresh),
  }
  for name, out in results.items():
    assert jax.tree.structure(out) == jax.tree.structure(tree), name
    for (path, got, want) in _pairs(out, tree):
      if check_sharding:
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (name, path, got.sharding)
      assert got.dtype == want.dtype and got.shape == want.shape
    for path, got, want in _pairs(out, expected.get(name, out)):
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                 rtol=1e-6, err_msg=f"{name} {path}")
  # Optimizer states sharded like the params; the copy in schedule-free's state too.
  params = {"k": tree["k"], "b": tree["b"]}
  new = {"k": fresh["k"], "b": fresh["b"]}
  for tx in (optax.adam(0.1), optax.contrib.schedule_free_sgd(0.1)):
    with jax.set_mesh(mesh):  # on the mesh: moments sharded like the params
      state = jax.jit(tx.init)(params)
    for mask in ({"k": True, "b": False}, {"k": element["k"], "b": element["b"]}):
      out = fn(reinit.reset_opt_state)(state, mask, params=new)
      for (path, got, want) in _pairs(out, state):
        assert not check_sharding or got.sharding.is_equivalent_to(want.sharding, got.ndim), (
            path, got.sharding)


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
