"""A group of runs (reinit.groups) trains each run as the run alone would, on any device count.

Tiny simple_cnn (width 0.25, 8x8 images), a few steps, on CPU (conftest gives 8 host devices).
"""

import functools
import types

import jax
from jax.sharding import NamedSharding, PartitionSpec
import jax.numpy as jnp
import numpy as np
import pytest

from reinit import groups
from reinit import models
from reinit import train

R = 4  # runs of the small groups
B = 8  # batch per run
N = 40  # union of the runs' training images
SUBSET = 24  # each run's training set, a subset of the union
SIZE = 8
CLASSES = 10
PAD = 1
RTOL, ATOL = 1e-5, 1e-6


def _state(model, tx, seed):
  variables = model.init(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
  return train.TrainState(jnp.zeros((), jnp.int32), variables, tx.init(variables["params"]), {})


@pytest.fixture(scope="module")
def setup():
  """Model, train step, data and the jitted pieces shared by the tests (compiled once)."""
  model = models.get_model("simple_cnn", num_classes=CLASSES, width=0.25)
  tx = train.make_optimizer(types.SimpleNamespace(weight_decay=5e-4, momentum=0.9,
                                                  nesterov=True))
  step = train.make_train_step(model, tx, num_classes=CLASSES, label_smoothing=0.0)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
  labels = rng.integers(0, CLASSES, (N,), dtype=np.int32)
  members = np.stack([rng.permutation(N)[:SUBSET] for _ in range(8)]).astype(np.int32)
  augmentation = dict(batch_size=B, pad=PAD, flip=True, pad_mode="reflect")
  batch_fn = jax.jit(functools.partial(groups.run_batch, **augmentation))
  loops = {s: jax.jit(groups.group_train_loop(step, steps=s, **augmentation)) for s in (1, 3)}
  return types.SimpleNamespace(
      model=model, tx=tx, step=jax.jit(step), raw_step=step, augmentation=augmentation, images=jnp.asarray(images),
      labels=jnp.asarray(labels), members=jnp.asarray(members),
      keys=jax.random.split(jax.random.key(42), 8),
      states=[_state(model, tx, seed) for seed in range(8)],
      batch=batch_fn, loops=loops,
      learning_rates=np.asarray([0.02, 0.01, 0.005], np.float32))


def _single_run(setup, i: int, steps: int):
  """Run i alone: `steps` unvmapped train steps on its batches of `run_batch`."""
  state, losses = setup.states[i], []
  for t in range(steps):
    batch = setup.batch(setup.keys[i], setup.images, setup.labels, setup.members[i], t)
    state, metrics = setup.step(state, batch, setup.learning_rates[t])
    losses.append(metrics["loss"])
  return state, np.asarray(losses)


def _assert_close(actual, expected):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL),
               actual, expected)


def _group(setup, steps: int, runs: int = R, windows: int = 1):
  """The first `runs` runs trained as a group: `windows` calls of the `steps`-step loop."""
  states = groups.stack(setup.states[:runs])
  losses = []
  for w in range(windows):
    lrs = setup.learning_rates[w * steps:(w + 1) * steps]
    states, metrics = setup.loops[steps](states, setup.images, setup.labels, setup.keys[:runs],
                                         lrs, setup.members[:runs])
    losses.append(np.asarray(metrics["loss"]))
  return states, np.concatenate(losses, axis=1)


def test_stack_unstack_round_trip(setup):
  stacked = groups.stack(setup.states[:3])
  assert stacked.variables["params"]["head"]["kernel"].shape[0] == 3
  for original, back in zip(setup.states[:3], groups.unstack(stacked, 3)):
    jax.tree.map(np.testing.assert_array_equal, back, original)
  with pytest.raises(ValueError, match="run axis"):
    groups.unstack(stacked, 4)


def test_group_step_equals_each_run_alone(setup):
  states, losses = _group(setup, steps=1)
  assert losses.shape == (R, 1)
  for i, run in enumerate(groups.unstack(states, R)):
    alone, alone_losses = _single_run(setup, i, steps=1)
    _assert_close(run.variables, alone.variables)
    _assert_close(run.opt_state, alone.opt_state)
    np.testing.assert_allclose(losses[i], alone_losses, rtol=RTOL)
  # The runs differ (own init, order, augmentation): the comparison is not of equal runs.
  params = [run.variables["params"]["head"]["kernel"] for run in groups.unstack(states, R)]
  assert not np.allclose(params[0], params[1])


def test_runs_mapped_one_after_the_other_equal_vmapped(setup):
  loop = jax.jit(groups.group_train_loop(setup.raw_step, steps=1, over_runs="map",
                                         **setup.augmentation))
  mapped, mapped_metrics = loop(groups.stack(setup.states[:R]), setup.images, setup.labels,
                                setup.keys[:R], setup.learning_rates[:1], setup.members[:R])
  vmapped, losses = _group(setup, steps=1)
  _assert_close(mapped.variables, vmapped.variables)
  np.testing.assert_allclose(mapped_metrics["loss"], losses, rtol=RTOL)
  with pytest.raises(ValueError, match="over_runs='pmap'.*vmap, map"):
    groups.group_train_loop(setup.raw_step, steps=1, over_runs="pmap", **setup.augmentation)


def test_scan_of_steps_equals_single_steps_and_windows_continue(setup):
  scanned, losses = _group(setup, steps=3)
  windowed, window_losses = _group(setup, steps=1, windows=3)
  np.testing.assert_allclose(window_losses, losses, rtol=RTOL)
  _assert_close(windowed.variables, scanned.variables)
  for i, run in enumerate(groups.unstack(scanned, R)):
    alone, alone_losses = _single_run(setup, i, steps=3)
    assert int(run.step) == 3
    _assert_close(run.variables, alone.variables)
    np.testing.assert_allclose(losses[i], alone_losses, rtol=RTOL)


def test_group_on_8_devices_equals_group_on_1(setup):
  assert jax.device_count() >= 8, "conftest sets 8 host devices"
  runs = 8
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("runs",))  # Auto axes, as the trainer
  spread = NamedSharding(mesh, PartitionSpec("runs"))
  replicated = NamedSharding(mesh, PartitionSpec())
  one = jax.devices()[0]

  def train_group(run_axis, shared):
    """Three one-step windows of the 8 runs, their run axis placed by `run_axis`."""
    states = jax.device_put(groups.stack(setup.states[:runs]), run_axis)
    keys, members = (jax.device_put(x, run_axis) for x in (setup.keys, setup.members))
    images, labels = (jax.device_put(x, shared) for x in (setup.images, setup.labels))
    losses = []
    for t in range(3):
      states, metrics = setup.loops[1](states, images, labels, keys,
                                       jax.device_put(setup.learning_rates[t:t + 1], shared),
                                       members)
      losses.append(np.asarray(metrics["loss"]))
    return states, np.concatenate(losses, axis=1)

  on_8, losses_8 = train_group(spread, replicated)
  on_1, losses_1 = train_group(one, one)
  kernel = on_8.variables["params"]["head"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  assert kernel.sharding.shard_shape(kernel.shape)[0] == 1  # one run per device
  assert len(on_1.variables["params"]["head"]["kernel"].sharding.device_set) == 1
  _assert_close(jax.device_get(on_8.variables), jax.device_get(on_1.variables))
  np.testing.assert_allclose(losses_8, losses_1, rtol=RTOL)


def test_epoch_order_is_a_permutation_per_epoch():
  n, batch, steps = 10, 4, 10  # 40 positions: 4 epochs, batches spanning epoch ends
  key = jax.random.key(0)
  order = np.asarray(groups.epoch_order(key, n, batch, steps))
  assert order.shape == (steps, batch) and order.dtype == np.int32
  epochs = order.reshape(-1, n)
  for epoch in epochs:
    assert sorted(epoch.tolist()) == list(range(n))
  assert len({tuple(e) for e in epochs}) == len(epochs)  # reshuffled every epoch
  other = np.asarray(groups.epoch_order(jax.random.key(1), n, batch, steps))
  assert not np.array_equal(order, other)
  # A window starting at step 3 is the same stream: orders continue across windows.
  np.testing.assert_array_equal(groups.epoch_order(key, n, batch, 2, start=3), order[3:5])
  np.testing.assert_array_equal(
      jax.jit(groups.epoch_order, static_argnums=(1, 2, 3))(key, n, batch, 2, jnp.int32(7)),
      order[7:9])


def _normalized(x):
  return (np.asarray(x, np.float32) / 255.0 - 0.5) / 0.25


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_augment_shapes_dtypes_and_normalization(dtype):
  images = np.random.default_rng(1).integers(0, 256, (6, 5, 7, 3)).astype(dtype)
  out = groups.augment(jax.random.key(0), images, pad=2, flip=True)
  assert out.shape == images.shape and out.dtype == jnp.float32
  # No crop, no flip: only the pipeline's normalization.
  np.testing.assert_allclose(groups.augment(jax.random.key(0), images, pad=0, flip=False),
                             _normalized(images), rtol=1e-6)


def test_augment_flip_is_an_exact_mirror():
  images = np.random.default_rng(2).integers(0, 256, (64, 4, 6, 3), dtype=np.uint8)
  out = np.asarray(groups.augment(jax.random.key(3), images, pad=0, flip=True))
  plain = np.asarray(groups.augment(jax.random.key(3), images, pad=0, flip=False))
  np.testing.assert_allclose(plain, _normalized(images), rtol=1e-6)
  mirrored = plain[:, :, ::-1]
  # Same pixels, mirrored; the tolerance only absorbs the rounding of the normalization (XLA
  # need not round alike in two programs), far below one pixel level (1/255/0.25 = 0.016).
  same = lambda a, b: np.allclose(a, b, rtol=0, atol=1e-6)
  is_plain = [same(o, p) for o, p in zip(out, plain)]
  is_mirror = [same(o, m) for o, m in zip(out, mirrored)]
  assert all(p or m for p, m in zip(is_plain, is_mirror))
  assert 10 < sum(is_mirror) < 54  # about half flipped


@pytest.mark.parametrize("pad_mode,numpy_mode", [("zero", "constant"), ("reflect", "reflect")])
def test_augment_crops_inside_the_padded_image(pad_mode, numpy_mode):
  pad, (h, w) = 2, (5, 6)
  # Distinct pixel values, so a crop's offset can be read back.
  images = (np.arange(64 * h * w * 3) % 251 + 1).reshape(64, h, w, 3).astype(np.float32)
  out = np.asarray(groups.augment(jax.random.key(4), images, pad=pad, flip=False,
                                  pad_mode=pad_mode))
  padded = _normalized(np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                              mode=numpy_mode))
  offsets = []
  for image, source in zip(out, padded):
    found = [(y, x) for y in range(2 * pad + 1) for x in range(2 * pad + 1)
             if np.allclose(image, source[y:y + h, x:x + w], rtol=0, atol=1e-6)]
    assert found, "a crop that is no window of the padded image"
    offsets.append(found[0])
  assert len(set(offsets)) > 5  # offsets drawn, not fixed


def test_augment_rejects_unknown_pad_mode():
  with pytest.raises(ValueError, match="pad_mode='wrap'.*reflect, zero"):
    groups.augment(jax.random.key(0), np.zeros((1, 4, 4, 3)), pad=1, flip=False,
                   pad_mode="wrap")


def test_runs_data_parallel_on_a_runs_by_data_mesh_equal_one_device(setup):
  # 2 runs on a 2 x 4 ("runs", "data") mesh: each run's batch of 8 split over 4 devices (the
  # gradient and BatchNorm statistics reduced across them), the same numbers as on one device.
  assert jax.device_count() >= 8, "conftest sets 8 host devices"
  runs = 2
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(runs, 4), ("runs", "data"))
  by_run, replicated = (NamedSharding(mesh, PartitionSpec(*spec)) for spec in (("runs",), ()))
  loop = jax.jit(groups.group_train_loop(
      setup.raw_step, steps=3, **setup.augmentation,
      batch_sharding=NamedSharding(mesh, PartitionSpec("data")), runs_axis="runs"))
  args = (jax.device_put(groups.stack(setup.states[:runs]), by_run),
          *jax.device_put((setup.images, setup.labels), replicated),
          *jax.device_put((setup.keys[:runs], setup.members[:runs]), by_run))
  states, images, labels, keys, members = args
  # Data parallel indeed: the compiled program reduces across the data axis.
  compiled = loop.lower(states, images, labels, keys, setup.learning_rates, members).compile()
  assert "all-reduce" in compiled.as_text()
  parallel, metrics = loop(states, images, labels, keys, setup.learning_rates, members)
  alone, losses = _group(setup, steps=3, runs=runs)
  kernel = parallel.variables["params"]["head"]["kernel"]
  assert kernel.sharding.shard_shape(kernel.shape)[0] == 1  # one run per row of devices
  _assert_close(jax.device_get(parallel.variables), jax.device_get(alone.variables))
  np.testing.assert_allclose(metrics["loss"], losses, rtol=RTOL)
