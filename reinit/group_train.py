"""The grouped trainer: `train_group(config, seeds, workdirs)` trains R runs of one config that
differ only in `seed` as one program (issue 14).

What the runs share: the model, optimizer, plan, schedule, the compiled window loop, the stage
switch and the eval step, the test split (on device, evaluated by every run at once), and the
union of their training images (on device, uint8). What each run keeps: its own initial state
(`reinit.runtime.initial_state` from `run_keys(seed)`, bit for bit the state the run alone starts
from), its subset (`members`, indices into the shared images), its data stream (`groups`: a pure
function of its data key and global step), its fresh draws at every switch
(`fold_in(keys.fresh, k)`), its calibration batches, its train-eval subset and its
`results.json`, written in its own workdir in the single-run format.

The states are stacked on a leading run axis (`groups.stack`) and checkpointed together, with
the loop's progress, in the group directory (orbax); started again with the same arguments the
group resumes from its newest checkpoint and ends as an unbroken group would, bit for bit (a
batch is a function of the data key and the state's step, so nothing else needs restoring).

Where the batches come from (`data_placement`): with the union of the training images on
device (small training sets, the default up to DEVICE_DATA_LIMIT_BYTES) the group draws them in
the compiled loop (`groups.run_batch` semantics), not from the tf.data stream, so run i equals a
group of one of its seed, not `train.train_and_evaluate` of it (the same distribution, other
numbers); fed from the host (`data_on='host'`, large training sets) each run reads its own
tf.data training and calibration streams, a window at a time, and is the seed's single run up
to the vmapped step's float rounding. Devices: a ("runs", "data") mesh (`group_devices`),
over several processes too (`jax.distributed`; device-fed groups only): every process computes
the same initial states and reads the whole training subset, the runs' states live on their
rows' devices, and metrics are gathered to every process (process 0 writes).

A sweep prepares its next group while one trains: `warm_up(config, seeds)` reads the group's
data and compiles its programs in a background thread, from shapes and shardings alone; the
group then finds them compiled (`_program`, one memo of compiled programs per process).

Keys of run `seed` beyond `run_keys(seed)`: data stream `fold_in(key(seed), DATA_STREAM)`,
calibration batches `fold_in(key(seed), CALIBRATION_STREAM)`.
"""

import concurrent.futures
import copy
import dataclasses
import functools
import hashlib
import math
import os
import threading
import time
import types
from typing import Any, Callable, NamedTuple, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from reinit import evaluation
from reinit import groups
from reinit import models
from reinit import preemption
from reinit import train
from reinit import transforms
from reinit import tree as tree_lib
from reinit import validation
from reinit import workdir as workdir_lib
from reinit.runtime import build_runtime
from reinit.runtime import flops
from reinit.runtime import initial_state
from reinit.runtime import rarely_run_jit
from reinit.runtime import run_keys
from reinit.steps import make_optimizer
from reinit.steps import optimizer_fields
from reinit.steps import OptimizerFields
from reinit.steps import make_train_step
from reinit.steps import stage_learning_rates
from reinit.steps import TrainState

PyTree = Any
DATA_STREAM = 3  # run_keys splits key(seed) in 3; fold_in(key(seed), 3) is independent of them
CALIBRATION_STREAM = 4
GROUP_DIR_SUFFIX = ".group"
CHECKPOINT_INTERVAL_S = 60
DATA_ON = ("auto", "device", "host")
# `data_on='auto'`: the union of the runs' training images on device up to this many bytes
# (uint8); above it, each run reads its tf.data stream on the host.
DEVICE_DATA_LIMIT_BYTES = 1 << 30
# Host-fed groups: the most bytes of input batches fed in one compiled call (a logging window
# is split into calls of fewer steps when its batches would take more).
FED_INPUT_BYTES = 1 << 28
PROGRAMS_KEPT = 64  # compiled programs kept per process (`_program`)


@flax.struct.dataclass
class GroupState:
  """What a group checkpoints: `runs`, the runs' TrainStates stacked (R, ...), and `step`,
  the global step (int32 scalar, the same for every run), which `workdir.restore_latest`
  checks against the checkpoint's step."""
  step: jax.Array
  runs: TrainState


# ---------------------------------------------------------------- data


def seed_config(config, seed: int):
  """`config` with `seed` replaced (everything else, subset_seed included, as it is)."""
  run = copy.deepcopy(config)
  run.seed = int(seed)
  return run


def union_of_subsets(subsets: Sequence[tuple[np.ndarray, np.ndarray]]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The union of the runs' (index, label) training examples and each run's members.

  Args:
    subsets: per run, (indices into the split, int (n,); labels trained on, int (n,)).

  Returns:
    (indices, labels, members): the distinct (index, label) pairs sorted, int64 (N,) and int32
    (N,) (an image appears twice where label noise gave it two labels in two runs), and
    members int32 (R, n), each run's examples in its own order as positions in the union.
  """
  pairs = np.concatenate([np.stack([np.asarray(i, np.int64), np.asarray(l, np.int64)], 1)
                          for i, l in subsets])
  union, inverse = np.unique(pairs, axis=0, return_inverse=True)
  sizes = {len(i) for i, _ in subsets}
  if len(sizes) != 1:
    raise ValueError(f"the runs' training subsets differ in size ({sorted(sizes)})")
  members = inverse.reshape(len(subsets), sizes.pop()).astype(np.int32)
  return union[:, 0], union[:, 1].astype(np.int32), members


def _augmentation(config, image_shape) -> dict:
  """The group loop's augmentation of `config.augment` (`reinit.data.preprocess`'s semantics)."""
  from reinit.data import preprocess  # pylint: disable=g-import-not-at-top
  pad = preprocess.crop_padding(*image_shape[:2]) if config.augment != "none" else 0
  return dict(pad=pad, flip=config.augment == "crop_flip", pad_mode="reflect")


def train_eval_batches(images: jax.Array, labels: jax.Array, true_labels: jax.Array,
                       members: jax.Array, batch_size: int) -> list[dict]:
  """Each run's training subset as eval batches, stacked (R, B, ...), read from the group's
  images on device (no input pipeline): the fields of `reinit.data.Data.train_eval` (image
  normalized, label trained on, mask, true_label, corrupted), the last batch padded (mask 0).

  Args:
    images: (N, H, W, C) uint8, the union of the runs' training images; labels: (N,) int32,
      trained on; true_labels: (N,) int32, the dataset's.
    members: (R, n) int32, each run's examples as indices into `images`.
    batch_size: B, examples per batch and run.
  """
  runs, n = members.shape
  padded = -(-n // batch_size) * batch_size
  indices = jnp.pad(members, ((0, 0), (0, padded - n)))
  mask = jnp.broadcast_to(jnp.arange(padded) < n, (runs, padded)).astype(jnp.float32)
  batches = []
  for start in range(0, padded, batch_size):
    chunk = indices[:, start:start + batch_size]
    batches.append({"image": groups.normalize(images[chunk]), "label": labels[chunk],
                    "mask": mask[:, start:start + batch_size], "true_label": true_labels[chunk],
                    "corrupted": (labels[chunk] != true_labels[chunk]).astype(jnp.float32)})
  return batches


# The test split, on device, shared by the groups of a process: (what `Data.eval` reads) ->
# batches. Two entries at most (a sweep over datasets moves on).
_TEST_BATCHES: dict = {}
# The training split read (labels, sizes) and the union of a group's training images, shared
# by the groups of a process like the test split: each group read them again through tf.data
# (0.9 s of a digits group's 7 s). A few entries (a sweep over training-set sizes has one
# union per size).
_SPLITS: dict = {}
_UNIONS: dict = {}
_UNION_CACHE_BYTES = 64 * 2**20
# The compiled programs of this process (`_program`) and their lock (which also guards starting
# `warm_up`'s thread); a lock for the data caches above: `warm_up`'s thread fills them all
# while a group trains.
_PROGRAMS: dict = {}
_PROGRAMS_LOCK = threading.Lock()
_CACHES_LOCK = threading.Lock()
_WARM_UP_THREAD = None  # `warm_up`'s, started when first asked for


@functools.lru_cache(maxsize=8)
def _layer_order(model, image_shape: tuple[int, ...]) -> tuple[str, ...]:
  """`tree.layer_order` of `model` on images of `image_shape`, traced once per process (0.2 s
  a group): the order of the forward pass does not depend on the init key."""
  return tuple(tree_lib.layer_order(model, jax.random.key(0),
                                    jnp.zeros((1, *image_shape), jnp.float32), train=False))


def _split_key(config) -> tuple:
  """What a `Data`'s split read depends on (`reinit.data.pipeline.split_key`)."""
  from reinit.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.split_key(config)


def _remember(cache: dict, key, value, entries: int):
  """`cache[key] = value`, the oldest entries dropped to keep at most `entries`; `value`."""
  while len(cache) >= entries:
    cache.pop(next(iter(cache)))
  cache[key] = value
  return value


def _group_data(config):
  """The `reinit.data.Data` of `config` as one process reads it whole (every process of a
  group holds all runs' data), its training split read once per process; data problems are
  one-line ConfigErrors (`train._load_data`)."""
  key = _split_key(config)
  with _CACHES_LOCK:
    if key not in _SPLITS:
      return _remember(_SPLITS, key, train._load_data(config, process_index=0, process_count=1),  # pylint: disable=protected-access
                       entries=2)
    split = _SPLITS[key]
  try:
    return split.with_config(config)
  except ValueError as e:
    raise validation.ConfigError(str(e).splitlines()[0]) from e


def _train_images(data, config, indices: np.ndarray) -> np.ndarray:
  """`data.train_images(indices)`, read once per process for the same split and indices when
  under `_UNION_CACHE_BYTES`."""
  key = (_split_key(config), indices.tobytes())
  with _CACHES_LOCK:
    if key in _UNIONS:
      return _UNIONS[key]
    images = data.train_images(indices)
    if images.nbytes <= _UNION_CACHE_BYTES:  # larger ones are not kept past their group
      images.flags.writeable = False  # shared by the groups
      _remember(_UNIONS, key, images, entries=4)
    return images


def _test_batches(data, config, sharding) -> list[dict]:
  """`data.eval(config.test_split)`'s batches placed by `sharding`, read once per process."""
  key = (config.tfds_name or config.dataset, config.data_dir, config.test_split,
         config.image_size, config.eval_batch_size, jax.process_index(), jax.process_count(),
         sharding)
  with _CACHES_LOCK:
    if key not in _TEST_BATCHES:
      _remember(_TEST_BATCHES, key, [_on_mesh(b, sharding)
                                     for b in data.eval(config.test_split).as_numpy_iterator()],
                entries=2)
    return _TEST_BATCHES[key]


# ---------------------------------------------------------------- the group's functions


def _windows(steps: int, every: int, start: int = 0, *, offset: int = 0,
             checkpoint_every: int = 0) -> list[tuple[int, int]]:
  """(first step, length) of the windows of a stage of `steps` from `start`: they end at the
  logging steps (multiples of `every` in the stage), at the stage end and, with
  `checkpoint_every` > 0, where the global step (`offset` + step in the stage) is a multiple of
  it, so that a group checkpoints the steps a single run does; whatever `start` is (resumes cut
  the same)."""
  out, i = [], start
  while i < steps:
    end = min(steps, (i // every + 1) * every)
    if checkpoint_every > 0:
      end = min(end, ((offset + i) // checkpoint_every + 1) * checkpoint_every - offset)
    out.append((i, end - i))
    i = end
  return out


def _train_window(loop, states, *inputs):
  """One compiled call: every run trains for the window's steps. (states, metrics (R, S))."""
  return loop(states, *inputs)


def data_placement(data_on: str, num_images: int, image_shape: Sequence[int]) -> str:
  """Where a group's training batches come from: 'device' (the union of the runs' training
  images on device, uint8; batches drawn inside the compiled loop) or 'host' (each run's own
  tf.data stream, the batches the run alone reads, fed a window at a time). `data_on`: one of
  DATA_ON; 'auto' is 'device' while the union, `num_images` of `image_shape`, takes at most
  DEVICE_DATA_LIMIT_BYTES."""
  from reinit.validation import ConfigError  # pylint: disable=g-import-not-at-top
  if data_on not in DATA_ON:
    raise ConfigError(f"data_on={data_on!r} is unknown; accepted: {', '.join(DATA_ON)}")
  if data_on != "auto":
    return data_on
  return "device" if num_images * math.prod(image_shape) <= DEVICE_DATA_LIMIT_BYTES else "host"


def _next_batches(iterators, steps: int, sharding: NamedSharding) -> dict:
  """The next `steps` batches of each run's stream, stacked (R, S, ...), placed by `sharding`."""
  per_run = [_host_stack([next(it) for _ in range(steps)]) for it in iterators]
  return jax.device_put(_host_stack(per_run), sharding)


def _on_mesh(tree: PyTree, sharding: NamedSharding) -> PyTree:
  """Values every process holds equal (numpy, or arrays on its own devices) -> arrays placed by
  `sharding`, whose devices may be other processes' too."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # placed as their raw bits
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)
  return jax.tree.map(put, tree)


def _fetched(tree: PyTree) -> PyTree:
  """Arrays -> numpy on the host, gathered from every process when this one holds only part
  of them (a collective: every process calls it)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def _host_stack(trees: list) -> PyTree:
  """Trees of numpy arrays stacked leaf by leaf on a new leading axis, on the host."""
  return jax.tree.map(lambda *leaves: np.stack(leaves), *trees)


class _FedTrainEval:
  """Each run's `Data.train_eval()` batches, stacked per run (R, B, ...) and placed by
  `sharding` one at a time, at every iteration (the runs' subsets have one size, so one number
  of batches): a large training set is never on device whole."""

  def __init__(self, datas, sharding: NamedSharding):
    self._datasets, self._sharding = [d.train_eval() for d in datas], sharding

  def __iter__(self):
    for batches in zip(*[ds.as_numpy_iterator() for ds in self._datasets]):
      yield jax.device_put(_host_stack(batches), self._sharding)


def _fed_chunks(length: int, chunk: int) -> list[int]:
  """The lengths a host-fed window of `length` steps is fed in: `chunk` steps at most."""
  return [min(chunk, length - i) for i in range(0, length, chunk)]


def _eval_group(eval_step, variables, batches, num_runs: int) -> list[dict]:
  """`evaluation.evaluate` of each run: metrics merged over batches, per-run totals read."""
  totals = evaluation.merged(eval_step, variables, batches, fetch=_fetched)
  return [evaluation.summary(jax.tree.map(lambda x, i=i: x[i], totals))
          for i in range(num_runs)]


# The window loop and eval steps are jitted once per process for what they close over (the
# linen module is hashable by its fields; the optimizer by its fields and the plan's wrapper):
# the groups of a sweep (methods differ in their switches, rarely in these) then share their
# traces and compiled programs, whatever the method. jax.jit keys the inputs' shapes itself.
@functools.lru_cache(maxsize=16)
def _window_loop(model, optimizer: OptimizerFields, wrapper, num_classes: int,
                 label_smoothing: float, steps: int, batch_size: int, over_runs: str,
                 augmentation: tuple, mesh: jax.sharding.Mesh):
  """`groups.group_train_loop` of the trainer's step, jitted with the states donated; each
  run's batch split on the mesh's `data` axis."""
  step = _train_step(model, optimizer, wrapper, num_classes, label_smoothing)
  return jax.jit(groups.group_train_loop(
      step, steps=steps, batch_size=batch_size, over_runs=over_runs, **dict(augmentation),
      **_data_parallel(mesh)), donate_argnums=0)


@functools.lru_cache(maxsize=16)
def _fed_window_loop(model, optimizer: OptimizerFields, wrapper, num_classes: int,
                     label_smoothing: float, over_runs: str, mesh: jax.sharding.Mesh):
  """`groups.fed_train_loop` of the trainer's step (batches read on the host), jitted with the
  states donated; each run's batch split on the mesh's `data` axis."""
  step = _train_step(model, optimizer, wrapper, num_classes, label_smoothing)
  return jax.jit(groups.fed_train_loop(step, over_runs=over_runs, **_data_parallel(mesh)),
                 donate_argnums=0)


def _data_parallel(mesh: jax.sharding.Mesh) -> dict:
  """The loops' `batch_sharding` and `runs_axis` on the group's mesh: each run's batch split
  on its `data` axis when that has more than one device, else left to XLA."""
  if mesh.shape["data"] == 1:
    return dict(batch_sharding=None, runs_axis=None)
  return dict(batch_sharding=NamedSharding(mesh, PartitionSpec("data")), runs_axis="runs")


def _signature(args) -> tuple:
  """(treedef, leaves) of `args` as shapes, dtypes and shardings: hashable, what a compiled
  program is specialized to."""
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                        for x in leaves)


def _program(key, build: Callable[[], jax.stages.Compiled]) -> jax.stages.Compiled:
  """The program `build()` compiles, once per process for `key` (the newest PROGRAMS_KEPT
  kept). A caller asking for one that another thread is compiling (`warm_up`'s) waits for it
  instead of compiling it again; a failed build is not kept (the next caller raises it)."""
  with _PROGRAMS_LOCK:
    future = _PROGRAMS.get(key)
    building = future is None
    if building:
      future = _remember(_PROGRAMS, key, concurrent.futures.Future(), entries=PROGRAMS_KEPT)
  if building:
    try:
      future.set_result(build())
    except BaseException as e:
      with _PROGRAMS_LOCK:
        if _PROGRAMS.get(key) is future:
          del _PROGRAMS[key]
      future.set_exception(e)
      raise
  return future.result()


def clear_programs() -> None:
  """Forgets the compiled programs of this process (tests that count compiles)."""
  with _PROGRAMS_LOCK:
    _PROGRAMS.clear()


def _compiled(jitted, treedef, leaves) -> jax.stages.Compiled:
  """`jitted` lowered and compiled for `_signature` (treedef, leaves), once per process: the
  groups of a sweep that share a window loop skip its tracing, lowering and cache read."""
  return _program((jitted, treedef, leaves),
                  lambda: jitted.lower(*jax.tree.unflatten(treedef, leaves)).compile())


def _train_step(model, optimizer: OptimizerFields, wrapper, num_classes: int,
                label_smoothing: float):
  """The trainer's single-run step of `model` with `wrapper(make_optimizer(optimizer))`."""
  return make_train_step(model, wrapper(make_optimizer(optimizer)), num_classes=num_classes,
                         label_smoothing=label_smoothing)


@functools.lru_cache(maxsize=16)
def _one_run_step(model, optimizer: OptimizerFields, wrapper, num_classes: int,
                  label_smoothing: float):
  """A single run's train step (`model` as a single run builds it), jitted."""
  return jax.jit(_train_step(model, optimizer, wrapper, num_classes, label_smoothing))


def _one_run_step_flops(model, optimizer, wrapper, num_classes, label_smoothing, state,
                        batch) -> float:
  """FLOPs of one run's train step as XLA counts a single run's (`train_step_flops` of
  `train_and_evaluate`): the work of the method, whatever the group's program does to batch
  it (im2col's patches count as a convolution; a scanned loop counts its body once)."""
  step = _one_run_step(model, optimizer, wrapper, num_classes, label_smoothing)
  return flops(_compiled(step, *_signature((state, batch, jnp.float32(0)))))


@functools.lru_cache(maxsize=16)
def _group_eval_step(model, num_classes: int, shared_batches: bool):
  """The eval step of every run at once: batches shared by the runs (the test split) or
  stacked per run (their training subsets). Jitted once per process for its arguments (the
  groups of a sweep evaluate the same model, whatever the method)."""
  return jax.jit(jax.vmap(evaluation.make_eval_step(model, num_classes=num_classes),
                          in_axes=(0, None if shared_batches else 0)))


def _eval_model(config, num_classes: int, model):
  """The module a group evaluates with: the training `model`, except with `conv='auto'` on
  CPU, where it is XLA's convolution (vmapped: grouped ones). Forward only, those run 2.6x
  faster than im2col at eval_batch_size 256 (im2col's patches of R x 256 images outgrow the
  caches: digits, 3 runs, 42,800 against 16,200 images/s; what makes grouped convolutions slow
  is their weight gradient, which evaluation does not compute). Training is unchanged;
  evaluations differ from im2col's only in float rounding."""
  if config.get("conv", "xla") != "auto" or jax.default_backend() != "cpu":
    return model
  return models.from_config(config, num_classes, 1)


def group_devices(config, num_runs: int) -> tuple[int, int]:
  """(runs, data): the group's mesh over the `num_devices` devices (-1: all). Runs spread over
  gcd(num_runs, devices) of them (one run a device row, no traffic between runs) and each run
  is data-parallel over the rest (its batch split, gradients and BatchNorm statistics reduced
  across them, as a single run on that many devices). `validation` has checked that the
  devices divide batch_size."""
  from reinit.validation import ConfigError  # pylint: disable=g-import-not-at-top
  from reinit.validation import num_devices  # pylint: disable=g-import-not-at-top
  devices = num_devices(config)
  if jax.process_count() > 1 and devices != jax.device_count():
    # Every process holds part of the group's arrays and takes part in its collectives.
    raise ConfigError(f"num_devices={config.get('num_devices', -1)} is invalid for a group over "
                      f"{jax.process_count()} processes; accepted: -1 or {jax.device_count()} "
                      "(every process's devices)")
  runs = math.gcd(num_runs, devices)
  return runs, devices // runs


def runs_mesh(runs: int, data: int = 1) -> jax.sharding.Mesh:
  """The group's ("runs", "data") mesh over the first runs x data devices, each process's side
  by side: with several processes, a run's row lies within one process when it fits there (its
  batch and gradients are then reduced without traffic between processes)."""
  devices = sorted(jax.devices(), key=lambda d: d.process_index)[:runs * data]
  return jax.sharding.Mesh(np.array(devices).reshape(runs, data), ("runs", "data"))


def _stage_start(model, tx, plan, image_shape, *, reset_optimizer: str, batch_size: int,
                 augmentation: dict, sharding: NamedSharding, fed: bool = False):
  """The start of a stage of every run, as one program: the plan's switch, the calibration of
  the stage's unit (if any) on the run's next calibration batches, the optimizer policy.

  Returns a jitted `(k, branch, states, fresh_keys, method_keys, calibration_keys, first,
  members, images, labels) -> states`: k (the stage) and `branch` (0: no calibration; i: the
  i-th of `calibrated_units(plan)`) are traced and shared by the runs, so one compile serves
  every stage of every run (a single run compiles its calibration once per unit). `first` is
  the position of the calibration batches in each run's calibration stream. Every leaf of
  the result is placed by `sharding` (the runs' axis): the compiled loop takes them so, and
  XLA would place leaves it computes from constants (standardization flags) replicated.

  With `fed` (batches read on the host): `(k, branch, states, fresh_keys, method_keys,
  calibration_images) -> states` instead, calibration_images float32 (R, K, B, H, W, C), each
  run's next K batches of its calibration stream (any values when `branch` is 0; None when the
  plan calibrates nothing).
  """
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  units = calibrated_units(plan)

  def calibration_branch(unit):
    return lambda variables, images: plan.calibration.apply(model.apply, variables, images, unit)

  def one(k, branch, state, fresh_key, method_key, calibration_images):
    fresh = model.init(jax.random.fold_in(fresh_key, k), dummy, train=False)
    switched = plan.switch(k, state.variables, fresh, state.memory,
                           jax.random.fold_in(method_key, k))
    variables = switched.variables
    if units:
      # The branches return one structure: the switched variables, a standardization set.
      variables = jax.lax.switch(
          branch, [lambda variables, _: variables] + [calibration_branch(u) for u in units],
          flax.core.unfreeze(variables), calibration_images)
    if reset_optimizer == "fresh":
      opt_state = tx.init(variables["params"])
    else:
      opt_state = transforms.reset_opt_state(state.opt_state, switched.touched)
    return TrainState(state.step, variables, opt_state, switched.memory)

  def drawn(k, branch, state, fresh_key, method_key, calibration_key, first, members, images,
            labels):
    calibration_images = None
    if units:
      steps = first + jnp.arange(plan.calibration.batches, dtype=jnp.int32)
      calibration_images = jax.vmap(lambda t: groups.run_batch(
          calibration_key, images, labels, members, t, batch_size=batch_size,
          **augmentation)["image"])(steps)
    return one(k, branch, state, fresh_key, method_key, calibration_images)

  if fed:
    return rarely_run_jit(jax.vmap(one, in_axes=(None, None, 0, 0, 0, 0)),
                          out_shardings=sharding)
  return rarely_run_jit(jax.vmap(drawn, in_axes=(None, None, 0, 0, 0, 0, None, 0, None, None)),
                        out_shardings=sharding)


def calibrated_units(plan) -> list[str]:
  """The units the plan calibrates after some switch, in the order of the stages."""
  units = [plan.calibrated_unit(k) for k in range(1, plan.num_stages)]
  return list(dict.fromkeys(u for u in units if u is not None))


# ---------------------------------------------------------------- the group


def _stop_preempted(manager, group_dir: str, step: int):
  """Waits for the checkpoint of `step`, then raises `train.Preempted`."""
  manager.wait_until_finished()
  logging.warning("preempted: group checkpoint of step %d written; stopping", step)
  raise train.Preempted(f"preempted at step {step}: the group's checkpoint is in {group_dir}; "
                        "run the same command again to resume", step)


def group_dir_of(workdirs: Sequence[str], seeds: Sequence[int],
                 placement: str = "device") -> str:
  """The default group directory: next to the first run's workdir, named by the group's seeds
  and, for a host-fed group, `.host` (a group of other seeds, e.g. under another
  runs_per_program, or whose batches come from elsewhere, never restores it)."""
  seeds = [int(s) for s in seeds]
  tag = ("-".join(map(str, seeds)) if len(seeds) <= 8 else
         f"{len(seeds)}-" + hashlib.sha1(repr(seeds).encode()).hexdigest()[:10])
  fed = ".host" if placement == "host" else ""
  return f"{os.path.normpath(workdirs[0])}.seeds={tag}{fed}{GROUP_DIR_SUFFIX}"


def out_of_memory_error(error: Exception, num_runs: int):
  """The one-line ConfigError of a group whose memory does not fit, or None if `error` is not
  an allocation failure."""
  from reinit.validation import ConfigError  # pylint: disable=g-import-not-at-top
  text = str(error)
  if not isinstance(error, jax.errors.JaxRuntimeError) or not any(
      mark in text for mark in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")):
    return None
  first = text.strip().splitlines()[0][:200]
  smaller = f"1..{num_runs - 1}" if num_runs > 1 else "1 (and a smaller batch_size)"
  return ConfigError(f"a group of runs_per_program={num_runs} runs does not fit in the device's "
                     f"memory ({first}); accepted: runs_per_program={smaller}, or smaller "
                     "batch_size / eval_batch_size")


def train_group(config, seeds: Sequence[int], workdirs: Sequence[str],
                group_dir: str | None = None, over_runs: str = "vmap",
                checkpoint_interval_s: int = CHECKPOINT_INTERVAL_S,
                data_on: str = "auto", next_group: tuple | None = None) -> list[dict]:
  """Trains the runs of `config` with each of `seeds` as one program; writes each run's
  `results.json` (single-run format) in its workdir; returns the runs' results.

  Args:
    config: a `configs/benchmark.py` config (its `seed` is replaced by each of `seeds`).
    seeds: R distinct seeds.
    workdirs: R run directories, one per seed (claimed as single runs claim theirs).
    group_dir: the group's checkpoints; default `group_dir_of(workdirs, seeds, placement)`
      (one of your own: keep `data_on`'s placement when resuming).
    over_runs: 'vmap' or 'map' (`groups.group_train_loop`: on CPU with conv='xla', vmapped
      convolutions become grouped ones, several times slower than the runs one by one).
    checkpoint_interval_s: stage ends checkpoint the group only when this many seconds passed
      since the last checkpoint (and none is being written); 0: at every stage end, as a
      single run does. Checkpoints at `checkpoint_every_steps` and on preemption are always
      written. A group of small runs spends most of its time writing checkpoints otherwise
      (digits: 7 stage ends in ~10 s); resume is exact from any checkpoint.
    data_on: 'auto', 'device' or 'host' (`data_placement`): the union of the training images
      on device, batches drawn in the compiled loop (small training sets; `reinit.groups`'
      semantics), or each run's own tf.data stream read on the host, a window at a time (large
      ones; run i then trains on the batches the run alone trains on).
    next_group: (config, seeds) of the group the caller trains next (with the same
      `over_runs` and `data_on`): `warm_up` starts on it once this group has its programs and
      has written its runs' initial variables, so the two groups' reads, compiles and writes
      do not compete (its tracing holds the GIL that orbax's writing threads need).

  Raises:
    ConfigError: as `train.train_and_evaluate`, seeds/workdirs that do not pair up, a group
      too large for the device's memory (`out_of_memory_error`: names runs_per_program), or,
      over several processes, a host-fed group or one on fewer than all devices.
    train.TrainingDiverged: a run's training loss became non-finite (names the run).
  """
  try:
    return _train_group(config, seeds, workdirs, group_dir, over_runs, checkpoint_interval_s,
                        data_on, next_group)
  except jax.errors.JaxRuntimeError as e:
    error = out_of_memory_error(e, len(seeds))
    if error is None:
      raise
    raise error from e


@dataclasses.dataclass
class _Setup:
  """What a group is built from, read and computed on the host (nothing placed on its mesh):
  the same for `warm_up` and `train_group`, so that both ask for the same programs."""
  config: Any  # the group's config (its seed is any of the runs')
  configs: list  # each run's (`seed_config`)
  datas: list  # each run's `reinit.data.Data`
  keys: list  # each run's `run_keys`
  single_model: Any  # the model as a run alone builds it
  units: list[str]
  plan: Any
  indices: np.ndarray  # `union_of_subsets`: the union's split indices, int64 (N,),
  labels: np.ndarray  # its labels trained on, int32 (N,),
  members: np.ndarray  # and each run's examples as positions in it, int32 (R, n)
  fed: bool  # batches read on the host (`data_placement`)
  fed_chunk: int  # host-fed: steps fed in one compiled call at most
  mesh: jax.sharding.Mesh
  runtime: Any  # one run's on one device of this process (its initial state)
  augmentation: dict
  learning_rates: list  # per stage, per step
  optimizer: OptimizerFields

  @property
  def info(self):
    return self.datas[0].info

  @property
  def by_run(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec("runs"))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def stage_offsets(self) -> np.ndarray:
    return np.cumsum([0] + [len(lrs) for lrs in self.learning_rates])

  @property
  def lengths(self) -> list[int]:
    """The window lengths of the stages (`_windows`; host-fed: cut into `_fed_chunks`): one
    compiled loop each, ahead of time, so that a stage cannot recompile one (a resume that
    cuts other windows, e.g. after log_every_steps changed, compiles its own)."""
    lengths = sorted({n for lrs, offset in zip(self.learning_rates, self.stage_offsets)
                      for _, n in _windows(len(lrs), self.config.log_every_steps,
                                           offset=int(offset),
                                           checkpoint_every=self.config.checkpoint_every_steps)})
    if self.fed:
      lengths = sorted({c for n in lengths for c in _fed_chunks(n, self.fed_chunk)})
    return lengths

  @property
  def batch_spec(self) -> dict:
    """A run's training batch, as its tf.data stream yields it (`Data.train`)."""
    return {"image": jax.ShapeDtypeStruct((self.config.batch_size, *self.info.image_shape),
                                          jnp.float32),
            "label": jax.ShapeDtypeStruct((self.config.batch_size,), jnp.int32)}


def _setup(config, seeds: list[int], data_on: str) -> _Setup:
  """The group's `_Setup`; every check of the config and its data first (ConfigError)."""
  from reinit.validation import ConfigError  # pylint: disable=g-import-not-at-top
  num_runs = len(seeds)
  data_placement(data_on, 0, (1,))  # a bad value fails before anything is read or written
  configs = [seed_config(config, s) for s in seeds]
  for c in configs:
    validation.validate(c)
  mesh = runs_mesh(*group_devices(config, num_runs))
  # Every process reads whole batches: the group's data and evaluation sets are on every device
  # (a multi-process group is device-fed; a host-fed one is refused below).
  first_data = _group_data(configs[0])
  datas = [first_data] + [first_data.with_seed(s) for s in seeds[1:]]
  info = datas[0].info
  single_model = models.from_config(config, info.num_classes)  # a run alone's (runs=1)
  units = list(_layer_order(single_model, info.image_shape))
  plan = train._plan(config, units)  # pylint: disable=protected-access
  indices, labels, members = union_of_subsets([d.train_subset() for d in datas])
  fed = data_placement(data_on, len(indices), info.image_shape) == "host"
  if fed and jax.process_count() > 1:
    raise ConfigError(
        f"a group fed from the host (data_on={data_on!r}, {len(indices)} training images) "
        f"trains in one process, not {jax.process_count()}; accepted: runs_per_program=1, or "
        "train_group(..., data_on='device') to hold the training images on every device")
  # Steps fed at once: a window's input on device stays under FED_INPUT_BYTES (float32).
  fed_chunk = max(1, FED_INPUT_BYTES // (
      4 * num_runs * config.batch_size * math.prod(info.image_shape)))
  one_device = copy.deepcopy(config)
  one_device.num_devices = 1
  runtime = build_runtime(one_device, info.num_classes, info.image_shape, plan, runs=num_runs,
                          devices=jax.local_devices()[:1])
  return _Setup(config=config, configs=configs, datas=datas, keys=[run_keys(s) for s in seeds],
                single_model=single_model, units=units, plan=plan, indices=indices,
                labels=labels, members=members, fed=fed, fed_chunk=fed_chunk, mesh=mesh,
                runtime=runtime, augmentation=_augmentation(config, info.image_shape),
                learning_rates=stage_learning_rates(config, plan, datas[0].steps_per_epoch),
                optimizer=optimizer_fields(config))


def _union_images(g: _Setup) -> np.ndarray:
  """The union's training images, uint8 (N, H, W, C), in the order of `g.indices`."""
  distinct = np.unique(g.indices)
  return _train_images(g.datas[0], g.configs[0], distinct)[np.searchsorted(distinct, g.indices)]


def _run_key_arrays(seeds: list[int], keys: list) -> tuple:
  """Each run's (data, calibration, fresh, method) keys, stacked (R,), on no mesh yet."""
  return (jnp.stack([jax.random.fold_in(jax.random.key(s), DATA_STREAM) for s in seeds]),
          jnp.stack([jax.random.fold_in(jax.random.key(s), CALIBRATION_STREAM) for s in seeds]),
          jnp.stack([k.fresh for k in keys]), jnp.stack([k.method for k in keys]))


def _placed_like(x, sharding) -> jax.ShapeDtypeStruct:
  """The shape and dtype `x` (numpy or jax) has once placed by `sharding` (`_on_mesh`)."""
  return jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(
      x.dtype, allow_extended_dtype=True), sharding=sharding)


class _Programs(NamedTuple):
  """A group's compiled programs (`_programs`)."""
  loops: dict  # window length -> compiled loop (others compiled when first asked for)
  stage_start: jax.stages.Compiled  # `_stage_start`'s, for the group's inputs
  train_step_flops: float  # one run's (`_one_run_step_flops`)


def _programs(g: _Setup, over_runs: str, seeds: list[int], one=None) -> _Programs:
  """The group's window loops (every length of `g.lengths`), stage start and one run's FLOPs,
  compiled for its inputs' shapes and shardings as `_train_group` places them, from `_program`'s
  memo when this process (or `warm_up`'s thread) compiled them already. `one`: a run's initial
  state's shapes and dtypes (default: computed, one run's state on one device)."""
  config, info, num_runs = g.config, g.info, len(seeds)
  by_run, replicated = g.by_run, g.replicated
  if one is None:  # not eval_shape: the init is a top-level jit with compiler options
    one = initial_state(g.runtime, g.keys[0])
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), one)
  states = jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_runs, *x.shape), x.dtype,
                                                       sharding=by_run), one)
  data_keys, calibration_keys, fresh_keys, method_keys = jax.tree.map(
      lambda x: _placed_like(x, by_run), _run_key_arrays(seeds, g.keys))
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  stage_start = _stage_start(g.runtime.model, g.runtime.tx, g.plan, info.image_shape,
                             reset_optimizer=config.reset_optimizer,
                             batch_size=config.batch_size, augmentation=g.augmentation,
                             sharding=by_run, fed=g.fed)
  if g.fed:
    loop = _fed_window_loop(g.runtime.model, g.optimizer, g.plan.optimizer, info.num_classes,
                            config.label_smoothing, over_runs, g.mesh)

    def loop_args(n):
      return (states, {k: jax.ShapeDtypeStruct((num_runs, n, *v.shape), v.dtype, sharding=by_run)
                       for k, v in g.batch_spec.items()}, jax.ShapeDtypeStruct((n,), jnp.float32))
    calibration = None
    if calibrated_units(g.plan):
      calibration = jax.ShapeDtypeStruct(
          (num_runs, g.plan.calibration.batches, config.batch_size, *info.image_shape),
          jnp.float32, sharding=by_run)
    start_args = (scalar, scalar, states, fresh_keys, method_keys, calibration)
  else:
    # Its shape, not its pixels: the images are read where they are placed (train_group).
    images = jax.ShapeDtypeStruct((len(g.indices), *info.image_shape), jnp.uint8,
                                  sharding=replicated)
    labels, members = _placed_like(g.labels, replicated), _placed_like(g.members, by_run)

    def loop_args(n):
      return (states, images, labels, data_keys, jax.ShapeDtypeStruct((n,), jnp.float32),
              members)
    start_args = (scalar, scalar, states, fresh_keys, method_keys, calibration_keys, scalar,
                  members, images, labels)

  class Loops(dict):
    def __missing__(self, n):
      jitted = loop if g.fed else _window_loop(
          g.runtime.model, g.optimizer, g.plan.optimizer, info.num_classes,
          config.label_smoothing, n, config.batch_size, over_runs,
          tuple(g.augmentation.items()), g.mesh)
      self[n] = _compiled(jitted, *_signature(loop_args(n)))
      return self[n]

  loops = Loops()
  for n in g.lengths:
    loops[n]  # pylint: disable=pointless-statement
  # The stage start closes over the group's plan: its key is what the plan is built from.
  signature = _signature(start_args)
  compiled_start = _program(("stage_start", workdir_lib.combination_key(config), g.fed,
                             *signature),
                            lambda: stage_start.lower(*start_args).compile())
  train_step_flops = _one_run_step_flops(
      g.single_model, g.optimizer, g.plan.optimizer, info.num_classes, config.label_smoothing,
      one, g.batch_spec)
  return _Programs(loops, compiled_start, train_step_flops)


def warm_up(config, seeds: Sequence[int], *, over_runs: str = "vmap",
            data_on: str = "auto") -> concurrent.futures.Future | None:
  """Starts reading the data of `train_group(config, seeds, ...)` and compiling its programs
  in a background thread, so that a sweep prepares its next group while this one computes
  (tracing and compiling are host work; the device would wait for them). Writes nothing and
  places on the device only one run's initial state, to learn its shapes (the group's inputs
  are described by shapes and shardings). Its errors are left to `train_group`, which meets
  them again where it would have. One process only: returns None on several (their groups
  compile in step); else the future of the work (its result None). The thread is joined at
  exit: a program ending while a warm-up compiles waits for that compile.
  """
  if jax.process_count() > 1:
    return None
  global _WARM_UP_THREAD
  with _PROGRAMS_LOCK:
    if _WARM_UP_THREAD is None:
      _WARM_UP_THREAD = concurrent.futures.ThreadPoolExecutor(
          max_workers=1, thread_name_prefix="group_train.warm_up")
  return _WARM_UP_THREAD.submit(_warm_up, config, [int(s) for s in seeds], over_runs, data_on)


def _warm_up(config, seeds: list[int], over_runs: str, data_on: str) -> None:
  """`warm_up`'s work, in its thread; a failure is logged, not raised."""
  try:
    _programs(_setup(config, seeds, data_on), over_runs, seeds)
  except Exception as e:  # pylint: disable=broad-except
    logging.info("warming up the group of seeds %s failed (train_group will say why): %s",
                 seeds, str(e).splitlines()[0] if str(e) else type(e).__name__)


def _train_group(config, seeds, workdirs, group_dir, over_runs, checkpoint_interval_s,
                 data_on, next_group):
  """`train_group`'s work."""
  from reinit.validation import ConfigError  # pylint: disable=g-import-not-at-top
  start_time = time.perf_counter()
  seeds, workdirs = [int(s) for s in seeds], list(workdirs)
  if not seeds or len(seeds) != len(workdirs) or len(set(seeds)) != len(seeds):
    raise ConfigError(f"seeds={seeds} and workdirs ({len(workdirs)}) must pair up one to one, "
                      "with distinct seeds")
  num_runs = len(seeds)
  g = _setup(config, seeds, data_on)
  configs, datas, info, plan, fed = g.configs, g.datas, g.info, g.plan, g.fed
  units, mesh, by_run, replicated = g.units, g.mesh, g.by_run, g.replicated
  learning_rates, stage_offsets = g.learning_rates, g.stage_offsets
  for c, w in zip(configs, workdirs):
    workdir_lib.claim(c, w)
  done = [workdir_lib.path(w, train.RESULTS_FILE) for w in workdirs]
  if all(p.exists() for p in done):
    return [workdir_lib.read_json(p) for p in done]
  test_batches = _test_batches(datas[0], config, replicated)
  if fed:
    images = labels = members = None
    train_batches = _FedTrainEval(datas, by_run)
  else:
    # The union of the training images, on device once, and each run's members.
    images, labels, true_labels = _on_mesh(
        (_union_images(g), g.labels, datas[0].split_labels(g.indices)), replicated)
    members = _on_mesh(g.members, by_run)
    train_batches = train_eval_batches(images, labels, true_labels, members,
                                       config.eval_batch_size)

  # Each run's initial state as a single run's on one device (of this process; every process
  # computes them all), then the runs spread.
  model = g.runtime.model
  states = _on_mesh(groups.stack([initial_state(g.runtime, k) for k in g.keys]), by_run)
  data_keys, calibration_keys, fresh_keys, method_keys = _on_mesh(
      _run_key_arrays(seeds, g.keys), by_run)

  # What this group waits for its programs (after a warm-up: what it had left to do).
  compile_start = time.perf_counter()
  loops, stage_start, train_step_flops = _programs(
      g, over_runs, seeds, one=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                            states))
  compile_s = time.perf_counter() - compile_start
  eval_model = _eval_model(config, info.num_classes, model)
  eval_test = _group_eval_step(eval_model, info.num_classes, shared_batches=True)
  eval_train = _group_eval_step(eval_model, info.num_classes, shared_batches=False)
  units_calibrated = calibrated_units(plan)
  if fed:
    fed_chunk = g.fed_chunk
    if units_calibrated:
      # The calibration input of stages that calibrate nothing (lax.switch's branch 0 ignores
      # it).
      calibration_zeros = jax.device_put(np.zeros(
          (num_runs, plan.calibration.batches, config.batch_size, *info.image_shape),
          np.float32), by_run)

  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writers = [metric_writers.create_default_writer(w, just_logging=jax.process_index() != 0)
             for w in workdirs]
  group_dir = group_dir or group_dir_of(workdirs, seeds, "host" if fed else "device")
  manager = workdir_lib.checkpoint_manager(group_dir, min_interval_s=checkpoint_interval_s or None)
  # SIGTERM/SIGUSR1 from here on: checkpoint at the end of the current window and stop.
  notice = preemption.Notice()

  def step_on_mesh(step: int) -> jax.Array:
    """The checkpoint's step, on the mesh as the states are (orbax saves global arrays only)."""
    return _on_mesh(np.int32(step), replicated)

  try:
    restored = workdir_lib.restore_latest(
        manager, workdir_lib.abstract(GroupState(step_on_mesh(0), states)))
    if restored is None:
      progress = train.Progress(stage_results=[[] for _ in seeds])  # a list per run
      for c, writer in zip(configs, writers):
        writer.write_hparams({k: v for k, v in workdir_lib.flat_config(c.to_dict()).items()
                              if isinstance(v, (int, float, str, bool))})
      workdir_lib.save_variables_of_runs(workdirs, "init",
                                         groups.unstack(states.variables, num_runs))
    else:
      group_state, saved = restored
      states, progress = group_state.runs, train.Progress(**saved)
      progress.resumed_from = progress.resumed_from + [progress.global_step]
      logging.info("group resumed from step %d (stage %d)", progress.global_step,
                   progress.stage)
    if next_group is not None:
      warm_up(*next_group, over_runs=over_runs, data_on=data_on)

    def save(force=True):
      workdir_lib.save_checkpoint(manager, GroupState(step_on_mesh(progress.global_step), states),
                                  dataclasses.asdict(progress), force=force)

    if fed:
      # Each run's streams as the run alone reads them, from where the group stopped.
      per_calibration = plan.calibration.batches if plan.calibration else 0
      train_iters = [d.train().skip(progress.global_step).as_numpy_iterator() for d in datas]
      calibration_iters = [
          d.train().skip(progress.calibrations * per_calibration).as_numpy_iterator()
          for d in datas] if units_calibrated else []
    every = config.checkpoint_every_steps
    must_save = False  # a checkpoint step or a preemption fell in the stage's last window
    stop_at_end = False  # the preemption fell in the stage's last window
    for k in range(progress.stage, plan.num_stages):
      if progress.step_in_stage == 0 and k > 0:
        unit = plan.calibrated_unit(k)
        branch = 0 if unit is None else units_calibrated.index(unit) + 1
        if fed:
          calibration = None
          if units_calibrated:
            calibration = (_next_batches(calibration_iters, per_calibration, by_run)["image"]
                           if unit is not None else calibration_zeros)
          states = stage_start(jnp.int32(k), jnp.int32(branch), states, fresh_keys,
                               method_keys, calibration)
        else:
          first = 0 if unit is None else progress.calibrations * plan.calibration.batches
          states = stage_start(jnp.int32(k), jnp.int32(branch), states, fresh_keys,
                               method_keys, calibration_keys, jnp.int32(first), members,
                               images, labels)
        progress.calibrations += unit is not None
      lrs = learning_rates[k]
      train_start = time.perf_counter()
      for first, length in _windows(len(lrs), config.log_every_steps, progress.step_in_stage,
                                    offset=int(stage_offsets[k]), checkpoint_every=every):
        window_rates = jnp.asarray(lrs[first:first + length])
        if fed:
          parts, done = [], 0
          for n in _fed_chunks(length, fed_chunk):
            states, part = _train_window(loops[n], states,
                                         _next_batches(train_iters, n, by_run),
                                         window_rates[done:done + n])
            parts.append(part)
            done += n
          metrics = jax.tree.map(lambda *p: np.concatenate(p, axis=1), *_fetched(parts))
        else:
          states, metrics = _train_window(loops[length], states, images, labels, data_keys,
                                          window_rates, members)
          metrics = _fetched(metrics)
        losses = metrics["loss"].mean(axis=1)
        bad = [seeds[i] for i in np.flatnonzero(~np.isfinite(losses))]
        if bad:
          raise train.TrainingDiverged(
              f"non-finite training loss at stage {k} for seeds {bad} (global step "
              f"{progress.global_step + length})")
        means = {name: np.asarray(v, np.float64).mean(axis=1) for name, v in metrics.items()}
        before = progress.global_step
        progress.step_in_stage, progress.global_step = first + length, before + length
        for i, writer in enumerate(writers):
          writer.write_scalars(progress.global_step,
                               {f"train/{n}": float(v[i]) for n, v in means.items()}
                               | {"train/learning_rate": float(lrs[first + length - 1]),
                                  "stage": k})
        last = first + length == len(lrs)
        at_checkpoint = every > 0 and before // every != progress.global_step // every
        # Asked at every step of the window, in order: on several processes, the step JAX's
        # sync protocol agrees on is one of them, and every process sees it in this window.
        preempted = any([notice.reached(step)
                         for step in range(before + 1, progress.global_step + 1)])
        if (at_checkpoint or preempted) and not last:
          save()
        must_save = must_save or ((at_checkpoint or preempted) and last)
        stop_at_end = stop_at_end or (preempted and last)
        if preempted and not last:
          _stop_preempted(manager, group_dir, progress.global_step)
      progress.train_s += time.perf_counter() - train_start
      eval_start = time.perf_counter()
      tests = _eval_group(eval_test, states.variables, test_batches, num_runs)
      trains = _eval_group(eval_train, states.variables, train_batches, num_runs)
      progress.eval_s += time.perf_counter() - eval_start
      for i, (test, tr) in enumerate(zip(tests, trains)):
        progress.stage_results[i].append(train.stage_record(plan, learning_rates, k, test, tr))
        writers[i].write_scalars(progress.global_step, train.eval_scalars(test, tr))
      logging.info("group stage %d/%d: mean test accuracy %.4f", k + 1, plan.num_stages,
                   np.mean([t["accuracy"] for t in tests]))
      progress.stage, progress.step_in_stage = k + 1, 0
      # One process stops at the first stage end after a signal (e.g. one received during the
      # evaluation); several only at the step they agreed on (a signal reaches one of them).
      signalled = notice.signal is not None and not notice.multiprocess
      # Stage ends: forced without an interval, at a checkpoint step or on preemption;
      # otherwise as the manager's policy says (decided on process 0 for all of them).
      save(force=not checkpoint_interval_s or must_save or signalled)
      must_save = False
      if k + 1 < plan.num_stages and (stop_at_end or signalled):
        _stop_preempted(manager, group_dir, progress.global_step)
      stop_at_end = False
  finally:
    # Also on errors and interrupts: an in-flight asynchronous save is completed.
    manager.wait_until_finished()
    notice.restore()
  for writer in writers:
    writer.flush()

  wall_s = time.perf_counter() - start_time
  steps = types.SimpleNamespace(train_step_flops=train_step_flops, compile_s=compile_s)
  results = []
  # Each run's results.json after its final variables: a run is finished once it has both.
  workdir_lib.save_variables_of_runs(workdirs, "final",
                                     groups.unstack(states.variables, num_runs))
  for i, (c, w) in enumerate(zip(configs, workdirs)):
    # The group's times shared equally by its runs (each run's share of the program).
    share = train.Progress(stage_results=progress.stage_results[i],
                           resumed_from=progress.resumed_from,
                           train_s=progress.train_s / num_runs, eval_s=progress.eval_s / num_runs)
    run = types.SimpleNamespace(config=c, plan=plan, learning_rates=learning_rates, steps=steps)
    result = train._results(run, datas[i].info, units, share, wall_s / num_runs)  # pylint: disable=protected-access
    result["time_s"]["compile"] = compile_s / num_runs
    result["devices"] = mesh.size  # the group's (one run a device when spread)
    if jax.process_index() == 0:
      workdir_lib.write_json_atomically(workdir_lib.path(w, train.RESULTS_FILE), result)
    results.append(result)
  return results
