"""Every method's stage switch against its definition, on a small model; DSD's sparse training;
the optimizer and schedule policies; and a short run of each method on digits."""

import re

import flax.linen as nn
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


def test_ke_wels_keeps_one_fixed_random_split_bit_for_bit(setup):
  _, _, init, trained, fresh = setup
  plan = _plan("ke", **{"ke.split_granularity": "weight", "ke.split_rate": 0.5})
  memory = plan.begin(init, jax.random.key(3))
  previous = None
  for k in (1, 2, 3):
    fresh_k = jax.tree.map(lambda f: f + k, fresh)  # a different fresh draw each stage
    switched = _switch(plan, k, trained, fresh_k, memory)
    kept_masks = []
    for (path, new), old, fr in zip(_leaves(switched.variables["params"]),
                                    jax.tree.leaves(trained["params"]),
                                    jax.tree.leaves(fresh_k["params"])):
      new, old, fr = map(np.asarray, (new, old, fr))
      kept = new == old  # trained and fresh values differ everywhere
      if not path.endswith("kernel"):  # biases and BatchNorm: never reset
        assert kept.all(), path
        continue
      assert kept.sum() == round(0.5 * kept.size), path
      np.testing.assert_array_equal(new[~kept], fr[~kept], err_msg=path)
      kept_masks.append(kept)
    if previous is not None:  # the same split in every generation
      assert all(np.array_equal(a, b) for a, b in zip(previous, kept_masks))
    previous = kept_masks
  np.testing.assert_array_equal(switched.memory["split_key"], memory["split_key"])


class _TwoConvNet(nn.Module):
  """block0: conv 3->4 + BN; block1: conv 4->6 + BN; head: dense 6->5. Images (N, 4, 4, 3)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    for name, features in (("block0", 4), ("block1", 6)):
      x = _ConvBN(features, name=name)(x, train)
    return nn.Dense(5, name="head")(jnp.mean(x, axis=(1, 2)))


class _ConvBN(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(self.features, (3, 3), use_bias=True)(x)
    return nn.relu(nn.BatchNorm(use_running_average=not train)(x))


def test_kels_is_the_leading_slim_network_written_by_hand():
  model = _TwoConvNet()
  x = jnp.ones((2, 4, 4, 3))
  variables = model.init(jax.random.key(0), x)
  units = reinit.layer_order(model, jax.random.key(0), x)
  assert units == ["block0", "block1", "head"]
  fit = methods.kels_mask(variables["params"], split_rate=0.5, units=units)
  # By hand, r = 0.5: ceil(0.5 * 4) = 2, ceil(0.5 * 6) = 3.
  conv0 = np.zeros((3, 3, 3, 4), bool)
  conv0[:, :, :, :2] = True  # first layer: every input (image) channel, 2 of 4 filters
  conv1 = np.zeros((3, 3, 4, 6), bool)
  conv1[:, :, :2, :3] = True  # only the 2 kept input channels, 3 of 6 filters
  head = np.zeros((6, 5), bool)
  head[:3, :] = True  # the 3 kept features, every class
  expected = {
      "block0": {"Conv_0": {"kernel": conv0, "bias": np.array([1, 1, 0, 0], bool)},
                 "BatchNorm_0": {"scale": True, "bias": True}},
      "block1": {"Conv_0": {"kernel": conv1, "bias": np.array([1, 1, 1, 0, 0, 0], bool)},
                 "BatchNorm_0": {"scale": True, "bias": True}},
      "head": {"kernel": head, "bias": np.ones(5, bool)},
  }
  assert jax.tree.structure(fit) == jax.tree.structure(expected)
  for (path, got), want in zip(_leaves(fit), jax.tree.leaves(expected)):
    if isinstance(want, bool):
      assert got is want, path
    else:
      np.testing.assert_array_equal(got, want, err_msg=path)

  # The switch resets exactly the complement, BatchNorm untouched, the same every stage.
  config = digits_config.get_config("method=ke")
  config.ke.split_granularity = "filter"
  plan = methods.make_plan(config, units)
  fresh = model.init(jax.random.key(1), x)
  trained = {**variables, "params": jax.tree.map(lambda p: p + 1.0, variables["params"])}
  switched = _switch(plan, 1, trained, fresh, plan.begin(variables, jax.random.key(2)))
  for (path, new), old, fr, want in zip(_leaves(switched.variables["params"]),
                                        jax.tree.leaves(trained["params"]),
                                        jax.tree.leaves(fresh["params"]),
                                        jax.tree.leaves(expected)):
    want = np.broadcast_to(np.asarray(want), np.shape(old))
    np.testing.assert_array_equal(np.where(want, old, fr), new, err_msg=path)


def test_kels_slim_network_lines_up_across_resnet_shortcuts():
  model = get_model("resnet18", num_classes=10, width=0.125)
  x = jnp.ones((1, 8, 8, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
  units = reinit.layer_order(model, jax.random.key(0), x)
  fit = methods.kels_mask(params, split_rate=0.5, units=units)
  # A block that downsamples: its conv1, conv2 and projection shortcut keep the same leading
  # output channels, so the residual sum adds kept channels to kept channels.
  block = fit["block2"]
  kept_out = {name: int(block[name]["kernel"][0, 0, 0].sum())
              for name in ("conv1", "conv2", "shortcut_conv")}
  channels = params["block2"]["conv2"]["kernel"].shape[-1]
  assert set(kept_out.values()) == {int(np.ceil(0.5 * channels))}
  for name in kept_out:
    assert block[name]["kernel"][0, 0, 0, :kept_out[name]].all()


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


@pytest.mark.parametrize("reset_batch_stats", [True, False, None])
def test_sp_matches_its_formula(setup, reset_batch_stats):
  """None: the default config, which keeps the statistics (README: reset, all sp runs of the
  digits study evaluated at chance)."""
  _, _, init, trained, fresh = setup
  knobs = {"sp.shrink": 0.3, "sp.perturb": 0.05}
  if reset_batch_stats is not None:
    knobs["sp.reset_batch_stats"] = reset_batch_stats
  plan = _plan("sp", **knobs)
  switched = _switch(plan, 1, trained, fresh, {})
  for (path, new), old, fr in zip(_leaves(switched.variables["params"]),
                                  jax.tree.leaves(trained["params"]),
                                  jax.tree.leaves(fresh["params"])):
    np.testing.assert_allclose(new, 0.3 * np.asarray(old) + 0.05 * np.asarray(fr), rtol=1e-6,
                               atol=1e-7, err_msg=path)
  # Running statistics: the fresh init's (Ash & Adams' blended network is the fresh one), or
  # the trained ones kept.
  expected = fresh["batch_stats"] if reset_batch_stats else trained["batch_stats"]
  assert jax.tree.structure(switched.variables["batch_stats"]) == jax.tree.structure(expected)
  for (path, new), want in zip(_leaves(switched.variables["batch_stats"]),
                               jax.tree.leaves(expected)):
    np.testing.assert_array_equal(new, want, err_msg=path)


def test_dsd_prunes_holds_zeros_and_releases(setup):
  model, x, init, trained, fresh = setup
  plan = _plan("dsd", epochs_per_stage=30, **{"dsd.sparsity": 0.3, "dsd.lr_factor": 0.1})
  assert plan.num_stages == 3 and plan.optimizer is methods.hold_at_zero
  # LW's compute (7 units: 7 stages of 30 epochs = 210), spread over the three phases.
  assert plan.epochs == (70, 70, 70)
  assert plan.learning_rates[2] == pytest.approx(0.1 * plan.learning_rates[0])
  memory = plan.begin(init, jax.random.key(0))
  assert all(np.all(k) for k in jax.tree.leaves(memory["keep"]))
  switched = _switch(plan, 1, trained, fresh, memory)
  kernel = np.asarray(switched.variables["params"]["block3"]["Conv_0"]["kernel"])
  pruned = ~np.asarray(switched.memory["keep"]["block3"]["Conv_0"]["kernel"])
  assert pruned.sum() == round(0.3 * kernel.size) and np.all(kernel[pruned] == 0)
  old = np.abs(np.asarray(trained["params"]["block3"]["Conv_0"]["kernel"]))
  assert old[pruned].max() <= old[~pruned].min()  # the smallest magnitudes went

  tx = plan.optimizer(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9))
  step = jax.jit(train.make_train_step(model, tx, num_classes=10, label_smoothing=0.0))
  labels = jnp.arange(8) % 10
  variables = switched.variables
  state = train.TrainState(jnp.zeros((), jnp.int32), variables, tx.init(variables["params"]),
                           switched.memory)
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


@pytest.mark.parametrize("steps,warmup", [(1, 0), (30, 0), (30, 3), (64, 6), (65, 6), (280, 0)])
def test_schedule_is_optaxs_over_exactly_the_stages_steps(steps, warmup):
  # The trainer evaluates optax's schedule over a longer, power-of-two range and cuts it: the
  # rates must be bit for bit those of the schedule over exactly `steps` steps (what runs
  # trained on before), and each step's rate that of the schedule at that step.
  config = digits_config.get_config("method=lw")
  config.warmup_epochs = warmup
  rates = train.warmup_cosine(config, peak=0.05, steps=steps, steps_per_epoch=1)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=0.05, warmup_steps=warmup, decay_steps=steps)
  exact = np.asarray(jax.vmap(schedule)(jnp.arange(steps)), np.float32)
  assert rates.dtype == np.float32 and rates.tobytes() == exact.tobytes()
  np.testing.assert_allclose(rates, [float(schedule(t)) for t in range(steps)], rtol=1e-6,
                             atol=1e-9)


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
  # Written from the definitions (README, Methods) for num_stages=2, 1 epoch a stage:
  epochs = {"baseline": [1], "baseline_long": [2]}.get(method, [1, 1])
  assert [s["epochs"] for s in results["stages"]] == epochs
  assert [s["stage"] for s in results["stages"]] == list(range(len(epochs)))
  assert results["compute"]["train_steps"] == sum(epochs) * 3  # ceil(40 / 16) steps an epoch
  for stage in results["stages"]:  # every test and training example counted, once
    assert stage["test_examples"] == 500
    assert stage["test_accuracy"] * 500 == pytest.approx(round(stage["test_accuracy"] * 500))
    assert stage["train_accuracy"] * 40 == pytest.approx(round(stage["train_accuracy"] * 40))
  assert results["test_accuracy"] == results["stages"][-1]["test_accuracy"]
  assert np.isfinite(results["stages"][-1]["train_loss"])


@pytest.mark.parametrize("num_stages, epochs", [(-1, (24, 23, 23)), (2, (10, 10)), (1, (10,))])
def test_dsd_gets_the_compute_of_the_others_and_respects_num_stages(num_stages, epochs):
  plan = _plan("dsd", epochs_per_stage=10, num_stages=num_stages)
  lw = _plan("lw", epochs_per_stage=10, num_stages=num_stages)
  assert plan.epochs == epochs  # by hand: 7 x 10 = 70 = 24 + 23 + 23; or capped
  assert sum(plan.epochs) == sum(lw.epochs)
  assert plan.learning_rates == (0.05, 0.05, 0.05 * 0.1)[:len(epochs)]


def test_paper_config_states_the_stage_counts_layer_order_gives():
  from configs import paper  # pylint: disable=g-import-not-at-top
  stated = int(re.search(r"ResNet-50 has (\d+) stages", paper.__doc__).group(1))
  model = get_model("resnet50", num_classes=10, width=0.125)
  units = reinit.layer_order(model, jax.random.key(0), jnp.ones((1, 32, 32, 3)))
  config = paper.get_config("study=full,model=resnet50,method=lw")
  assert methods.make_plan(config, units).num_stages == stated == 18


def _lw_expected(k, trained, fresh, init, *, rescale=True, reset_batch_stats=True,
                 rescale_zero_init=True):
  """LW's switch written from its definition (README, Methods), leaf by leaf, in numpy."""
  def unit_of(path):
    return path.split("/")[1]
  out = {}
  for path, old, fr, ini in zip(reinit.paths(trained), jax.tree.leaves(trained),
                                jax.tree.leaves(fresh), jax.tree.leaves(init)):
    collection = path.split("/")[0]
    old, fr, ini = map(np.asarray, (old, fr, ini))
    kept = collection == "norm" or UNITS.index(unit_of(path)) < k
    if not kept:
      out[path] = fr if (collection == "params" or reset_batch_stats) else old
    elif collection == "params" and rescale and (np.linalg.norm(ini) > 1e-6 or rescale_zero_init):
      norm = np.linalg.norm(old)
      out[path] = old * (np.linalg.norm(ini) / norm) if np.linalg.norm(ini) > 1e-6 else 0 * old
    elif collection == "batch_stats" and rescale:
      unit = unit_of(path)
      s = (np.linalg.norm(init["params"][unit]["Conv_0"]["kernel"])
           / np.linalg.norm(trained["params"][unit]["Conv_0"]["kernel"]))
      out[path] = old * (s if path.endswith("mean") else s * s)
    elif collection == "norm" and path.endswith("active"):
      out[path] = 0 * old
    else:
      out[path] = old
  return out


@pytest.mark.parametrize("method, knobs", [
    ("lw", {}),
    ("lw_norescale", {}),
    ("lw_nonorm", {}),
    ("lw", {"lw.rescale_zero_init": False}),
    ("lw", {"lw.reset_batch_stats": False}),
])
def test_lw_variants_under_a_traced_stage_match_their_definition(setup, method, knobs):
  _, _, init, trained, fresh = setup
  plan = _plan(method, **knobs)
  assert (plan.calibrated_unit(2) is None) == (method == "lw_nonorm")
  memory = plan.begin(init, jax.random.key(3))
  definition = dict(rescale=method != "lw_norescale",
                    reset_batch_stats=knobs.get("lw.reset_batch_stats", True),
                    rescale_zero_init=knobs.get("lw.rescale_zero_init", True))
  for k in (1, 4):
    switched = _switch(plan, k, trained, fresh, memory)
    expected = _lw_expected(k, trained, fresh, init, **definition)
    for path, new in _leaves(switched.variables):
      np.testing.assert_allclose(new, expected[path], rtol=2e-5, atol=1e-6, err_msg=path)
    # touched: every param the switch changed (reset, rescaled), nothing else.
    for path, t in _leaves(switched.touched):
      changed = not np.array_equal(expected["params/" + path], trained_leaf(trained, path))
      assert bool(t) == changed, path


def trained_leaf(trained, path):
  node = trained["params"]
  for part in path.split("/"):
    node = node[part]
  return np.asarray(node)


def test_masked_optimizer_policy_resets_lw_rescaled_units(setup):
  _, _, init, trained, fresh = setup
  plan = _plan("lw", **{"lw.rescale_zero_init": False})  # BN biases of kept units unchanged
  switched = _switch(plan, 2, trained, fresh, plan.begin(init, jax.random.key(0)))
  tx = train.make_optimizer(digits_config.get_config())
  opt_state = tx.init(trained["params"])
  _, opt_state = tx.update(jax.tree.map(jnp.ones_like, trained["params"]), opt_state,
                           trained["params"])
  reset = reinit.reset_opt_state(opt_state, switched.touched)
  momentum = reset.inner_state[1][0].trace
  before = opt_state.inner_state[1][0].trace
  assert not np.any(momentum["block0"]["Conv_0"]["kernel"])  # kept but rescaled: reset
  assert not np.any(momentum["block3"]["Conv_0"]["kernel"])  # reinitialized: reset
  np.testing.assert_array_equal(momentum["block0"]["BatchNorm_0"]["bias"],  # kept as it was
                                before["block0"]["BatchNorm_0"]["bias"])
