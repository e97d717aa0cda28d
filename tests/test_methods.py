"""Every method's stage switch against its definition, on a small model; DSD's sparse training;
the optimizer and schedule policies; and a short run of each method on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reinit
from configs import digits as digits_config
from reinit import methods
from reinit import train
from reinit.models import get_model

UNITS = [f"block{i}" for i in range(6)] + ["head"]


@pytest.fixture(scope="module")
def setup():
  model = get_model("simple_cnn", num_classes=10, width=0.25)
  x = jax.random.normal(jax.random.key(9), (8, 8, 8, 1))
  init = model.init(jax.random.key(0), x)
  noise = jax.tree.map(lambda p: jax.random.normal(jax.random.key(5), p.shape), init["params"])
  trained = {**init, "params": jax.tree.map(lambda p, n: 2.0 * p + 0.3 * n, init["params"],
                                            noise),
             "batch_stats": jax.tree.map(lambda s: s + 0.7, init["batch_stats"])}
  fresh = model.init(jax.random.key(1), x)
  return model, x, init, trained, fresh


def _plan(method, **knobs):
  config = digits_config.get_config(f"method={method}")
  for key, value in knobs.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return methods.make_plan(config, UNITS)


def _switch(plan, k, trained, fresh, memory, rng=jax.random.key(7)):
  # k traced, as the trainer calls it: one compiled switch for all stages.
  return jax.jit(plan.switch)(jnp.int32(k), trained, fresh, memory, rng)


def _leaves(tree):
  return zip(reinit.paths(tree), jax.tree.leaves(tree))


def _same_shapes(a, b):
  return jax.tree.map(lambda x: (x.shape, x.dtype), a) == jax.tree.map(lambda x: (x.shape, x.dtype), b)


@pytest.mark.parametrize("method", methods.METHODS)
def test_switch_keeps_structure_shapes_and_dtypes(setup, method):
  """A stage changes values, never programs: every switch returns what it was given, in shape."""
  _, _, init, trained, fresh = setup
  plan = _plan(method)
  memory = plan.begin(init, jax.random.key(3))
  for k in range(1, plan.num_stages):
    switched = _switch(plan, k, trained, fresh, memory)
    assert jax.tree.structure(switched.variables) == jax.tree.structure(trained)
    assert _same_shapes(switched.variables, trained)
    assert jax.tree.structure(switched.memory) == jax.tree.structure(memory)
    assert jax.tree.structure(switched.touched) == jax.tree.structure(trained["params"])


def test_restarts_never_changes_a_weight(setup):
  _, _, init, trained, fresh = setup
  plan = _plan("restarts")
  assert plan.num_stages == 7  # those of lw, its compare_with
  switched = _switch(plan, 3, trained, fresh, plan.begin(init, jax.random.key(0)))
  for (path, new), old in zip(_leaves(switched.variables), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(new, old, err_msg=path)
  assert not any(jax.tree.leaves(switched.touched))


@pytest.mark.parametrize("method, reset_units", [
    ("head", ["head"]),
    ("llf", ["block4", "block5", "head"]),  # reset_from=-3
])
def test_layer_methods_reset_exactly_their_units(setup, method, reset_units):
  _, _, init, trained, fresh = setup
  plan = _plan(method)
  for k in (1, 2):
    switched = _switch(plan, k, trained, fresh, {})
    for (path, new), old, fr in zip(_leaves(switched.variables), jax.tree.leaves(trained),
                                    jax.tree.leaves(fresh)):
      collection, unit = path.split("/")[:2]
      reset = unit in reset_units and collection in ("params", "batch_stats")
      np.testing.assert_array_equal(new, fr if reset else old, err_msg=path)


def test_llf_reset_from_by_name_and_errors():
  assert _plan("llf", **{"llf.reset_from": "block2"}) is not None
  with pytest.raises(ValueError, match="llf.reset_from"):
    _plan("llf", **{"llf.reset_from": "block9"})
  with pytest.raises(ValueError, match="llf.reset_from"):
    _plan("llf", **{"llf.reset_from": "7"})


@pytest.mark.parametrize("granularity", ["weight", "filter"])
def test_ke_keeps_fit_hypothesis_bit_for_bit(setup, granularity):
  _, _, init, trained, fresh = setup
  plan = _plan("ke", **{"ke.split_granularity": granularity, "ke.split_rate": 0.5})
  memory = plan.begin(init, jax.random.key(3))
  fit = methods.ke_fit_mask(jax.random.wrap_key_data(memory["split_key"]), trained["params"],
                            split_rate=0.5, granularity=granularity)
  previous = None
  for k in (1, 2, 3):
    fresh_k = jax.tree.map(lambda f: f + k, fresh)  # a different fresh draw each stage
    switched = _switch(plan, k, trained, fresh_k, memory)
    assert switched.memory is memory or np.array_equal(switched.memory["split_key"],
                                                       memory["split_key"])
    for (path, new), old, fr, m in zip(_leaves(switched.variables["params"]),
                                       jax.tree.leaves(trained["params"]),
                                       jax.tree.leaves(fresh_k["params"]),
                                       jax.tree.leaves(fit)):
      new, old, fr = map(np.asarray, (new, old, fr))
      if isinstance(m, bool):  # outside the split: kept
        np.testing.assert_array_equal(new, old, err_msg=path)
        continue
      m = np.asarray(m)
      np.testing.assert_array_equal(new[m], old[m], err_msg=path)  # fit: bit for bit
      np.testing.assert_array_equal(new[~m], fr[~m], err_msg=path)  # reset: the fresh draw
      if path.endswith("kernel"):
        assert m.sum() == round(0.5 * m.size)
    touched = jax.tree.leaves(switched.touched)
    if previous is not None:  # the same split in every generation
      assert all(np.array_equal(a, b) for a, b in zip(previous, touched))
    previous = touched
  if granularity == "filter":
    kernel = np.asarray(fit["block1"]["Conv_0"]["kernel"])
    np.testing.assert_array_equal(fit["block1"]["BatchNorm_0"]["scale"], kernel[0, 0, 0])


def test_rand_draws_a_new_subset_each_stage(setup):
  _, _, init, trained, fresh = setup
  plan = _plan("rand", **{"rand.fraction": 0.25})
  masks = []
  for k in (1, 2):
    switched = _switch(plan, k, trained, fresh, {}, rng=jax.random.fold_in(jax.random.key(7), k))
    kernel_new = np.asarray(switched.variables["params"]["block2"]["Conv_0"]["kernel"])
    kernel_old = np.asarray(trained["params"]["block2"]["Conv_0"]["kernel"])
    kernel_fresh = np.asarray(fresh["params"]["block2"]["Conv_0"]["kernel"])
    m = np.asarray(switched.touched["block2"]["Conv_0"]["kernel"])
    assert m.sum() == round(0.25 * m.size)
    np.testing.assert_array_equal(kernel_new[m], kernel_fresh[m])
    np.testing.assert_array_equal(kernel_new[~m], kernel_old[~m])
    np.testing.assert_array_equal(switched.variables["params"]["block2"]["BatchNorm_0"]["bias"],
                                  trained["params"]["block2"]["BatchNorm_0"]["bias"])
    masks.append(m)
  assert not np.array_equal(masks[0], masks[1])


def test_sp_matches_its_formula(setup):
  _, _, init, trained, fresh = setup
  plan = _plan("sp", **{"sp.shrink": 0.3, "sp.perturb": 0.05})
  switched = _switch(plan, 1, trained, fresh, {})
  for (path, new), old, fr in zip(_leaves(switched.variables["params"]),
                                  jax.tree.leaves(trained["params"]),
                                  jax.tree.leaves(fresh["params"])):
    np.testing.assert_allclose(new, 0.3 * np.asarray(old) + 0.05 * np.asarray(fr), rtol=1e-6,
                               atol=1e-7, err_msg=path)
  for (path, new), old in zip(_leaves(switched.variables["batch_stats"]),
                              jax.tree.leaves(trained["batch_stats"])):
    np.testing.assert_array_equal(new, old, err_msg=path)


def test_dsd_prunes_holds_zeros_and_releases(setup):
  model, x, init, trained, fresh = setup
  plan = _plan("dsd", **{"dsd.sparsity": 0.3, "dsd.lr_factor": 0.1})
  assert plan.num_stages == 3 and plan.holds_zeros
  assert plan.learning_rates[2] == pytest.approx(0.1 * plan.learning_rates[0])
  memory = plan.begin(init, jax.random.key(0))
  assert all(np.all(k) for k in jax.tree.leaves(memory["keep"]))
  switched = _switch(plan, 1, trained, fresh, memory)
  kernel = np.asarray(switched.variables["params"]["block3"]["Conv_0"]["kernel"])
  pruned = ~np.asarray(switched.memory["keep"]["block3"]["Conv_0"]["kernel"])
  assert pruned.sum() == round(0.3 * kernel.size) and np.all(kernel[pruned] == 0)
  old = np.abs(np.asarray(trained["params"]["block3"]["Conv_0"]["kernel"]))
  assert old[pruned].max() <= old[~pruned].min()  # the smallest magnitudes went

  tx = optax.sgd(0.1, momentum=0.9)
  step = jax.jit(train.make_train_step(model, optax.inject_hyperparams(
      lambda learning_rate: tx)(learning_rate=0.1), num_classes=10, label_smoothing=0.0,
      holds_zeros=True))
  labels = jnp.arange(8) % 10
  variables = switched.variables
  state = train.TrainState(jnp.zeros((), jnp.int32), variables,
                           optax.inject_hyperparams(lambda learning_rate: tx)(
                               learning_rate=0.1).init(variables["params"]), switched.memory)
  for _ in range(3):  # sparse training: pruned weights stay exactly zero, the rest move
    state, _ = step(state, {"image": x, "label": labels}, jnp.float32(0.1))
    kernel_now = np.asarray(state.variables["params"]["block3"]["Conv_0"]["kernel"])
    assert np.all(kernel_now[pruned] == 0)
  assert not np.array_equal(kernel_now[~pruned], kernel[~pruned])

  released = _switch(plan, 2, state.variables, fresh, state.memory)
  assert all(np.all(k) for k in jax.tree.leaves(released.memory["keep"]))
  state = state.replace(variables=released.variables, memory=released.memory)
  state, _ = step(state, {"image": x, "label": labels}, jnp.float32(0.1))
  kernel_dense = np.asarray(state.variables["params"]["block3"]["Conv_0"]["kernel"])
  assert np.count_nonzero(kernel_dense[pruned]) > 0  # non-zero updates resume


def test_schedules_restart_or_continue():
  config = digits_config.get_config("method=lw")
  config.num_stages = 3
  config.warmup_epochs = 0.0
  plan = methods.make_plan(config, UNITS)
  restarted = train.stage_learning_rates(config, plan, steps_per_epoch=2)
  assert [len(r) for r in restarted] == [30, 30, 30]
  for r in restarted:
    np.testing.assert_allclose(r, restarted[0])
    assert r[0] == pytest.approx(config.learning_rate)
  config.restart_schedule = False
  continued = np.concatenate(train.stage_learning_rates(config, plan, steps_per_epoch=2))
  assert continued[0] == pytest.approx(config.learning_rate)
  assert np.all(np.diff(continued) <= 1e-9)  # one cosine over all 90 steps
  assert continued[45] == pytest.approx(config.learning_rate / 2, rel=0.05)


def test_masked_optimizer_policy_zeroes_only_touched(setup, tmp_path):
  _, _, init, trained, fresh = setup
  plan = _plan("head")
  switched = _switch(plan, 1, trained, fresh, {})
  tx = train.make_optimizer(digits_config.get_config())
  opt_state = tx.init(trained["params"])
  grads = jax.tree.map(jnp.ones_like, trained["params"])
  _, opt_state = tx.update(grads, opt_state, trained["params"])
  reset = reinit.reset_opt_state(opt_state, switched.touched)
  for path, new, old in zip(reinit.paths(reset), jax.tree.leaves(reset),
                            jax.tree.leaves(opt_state)):
    if "/head/" in f"/{path}/" and np.ndim(new) > 0:
      assert not np.any(new), path
    else:
      np.testing.assert_array_equal(new, old, err_msg=path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("method", methods.METHODS)
def test_each_method_runs_on_digits(method, data_dir, tmp_path):
  config = digits_config.get_config(f"method={method}")
  config.data_dir = data_dir
  config.width = 0.125
  config.train_examples = 40
  config.batch_size = 16
  config.epochs_per_stage = 1
  config.num_stages = 2
  if method == "lw":
    config.reset_optimizer = "masked"
    config.restart_schedule = False
  results = train.train_and_evaluate(config, str(tmp_path))
  expected_stages = {"baseline": 1, "baseline_long": 1, "dsd": 3}.get(method, 2)
  assert len(results["stages"]) == expected_stages
  assert results["compute"]["train_steps"] == results["total_epochs"] * 3  # ceil(40 / 16)
  assert 0.0 <= results["test_accuracy"] <= 1.0
