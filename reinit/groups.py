"""A group of runs in one program: R runs with a leading run axis, data on device.

The runs of a group differ only in their seed: the same model, optimizer and schedule, each
with its own initialization, data order and augmentation. Their states are stacked along a
leading run axis (`stack`), the trainer's single-run train step is `jax.vmap`ped over it and
`lax.scan`ned over a logging window (`group_train_loop`), so one compiled call trains every run
for several steps and the host loop costs once per window, not once per step.

The training images live on the device: the union of the runs' training sets, (N, H, W, C)
uint8 (or float32 0..255), shared by all runs; each run reads its batches by index
(`epoch_order`, one permutation of its examples per epoch) and augments them with `jax.random`
(`augment`: the semantics of `reinit.data.pipeline.augment_image`, not its random stream).

Keys of a run's data stream: `order_key, augment_key = jax.random.split(data_key)`; epoch e of
the order is `permutation(fold_in(order_key, e))`, the augmentation of global step t uses
`fold_in(augment_key, t)`. A batch is therefore a pure function of (data key, global step):
the stream continues across windows, stages and restarts from the state's step counter.

Imports only jax.
"""

from collections.abc import Callable
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
# The normalization of `reinit.data.pipeline.normalize`: uint8 0..255 -> (x / 255 - 0.5) / 0.25.
_MEAN, _STD = 0.5, 0.25
PAD_MODES = {"reflect": "reflect", "zero": "constant"}
OVER_RUNS = ("vmap", "map")


# ---------------------------------------------------------------- the run axis


def stack(trees) -> PyTree:
  """R pytrees of one structure -> one pytree whose leaves have a leading run axis (R, ...)."""
  trees = list(trees)
  if not trees:
    raise ValueError("stack needs at least one tree")
  return _stack(trees)


def unstack(tree: PyTree, num_runs: int) -> list[PyTree]:
  """A pytree with a leading run axis of size `num_runs` -> the list of the runs' pytrees."""
  for leaf in jax.tree.leaves(tree):
    if leaf.shape[:1] != (num_runs,):
      raise ValueError(f"a leaf of shape {leaf.shape} has no leading run axis of {num_runs}")
  return _unstack(tree, num_runs)


# One compiled call each instead of one dispatch per leaf and run (a model's state has ~100
# leaves); copies, so the values are exactly the inputs'.
@jax.jit
def _stack(trees: list) -> PyTree:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(tree: PyTree, num_runs: int) -> list[PyTree]:
  return [jax.tree.map(lambda leaf, i=i: leaf[i], tree) for i in range(num_runs)]


# ---------------------------------------------------------------- input on device


def data_keys(data_key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(order_key, augment_key) of a run's data stream."""
  order_key, augment_key = jax.random.split(data_key)
  return order_key, augment_key


def epoch_order(key: jax.Array, num_examples: int, batch_size: int, steps: int,
                start: int | jax.Array = 0) -> jax.Array:
  """Example indices of `steps` consecutive batches, starting at global step `start`.

  The stream is the concatenation of one permutation of range(num_examples) per epoch (epoch e
  drawn with `fold_in(key, e)`), cut into batches of `batch_size`; a batch may span two epochs,
  as the trainer's `shuffle -> repeat -> batch` tf.data stream does.

  Args:
    key: the run's order key.
    num_examples: N, examples of the run (static).
    batch_size: B (static).
    steps: S, batches returned (static).
    start: global step of the first batch; may be traced.

  Returns:
    int32 (S, B) indices in [0, N).
  """
  first = jnp.asarray(start, jnp.int32) * batch_size  # position of the first example
  positions = first + jnp.arange(steps * batch_size, dtype=jnp.int32)
  first_epoch = first // num_examples
  # Epochs the window touches: its S*B positions cross at most this many epoch boundaries.
  epochs = math.ceil(steps * batch_size / num_examples) + 1
  orders = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(key, e), num_examples))(
      first_epoch + jnp.arange(epochs, dtype=jnp.int32))
  indices = orders[positions // num_examples - first_epoch, positions % num_examples]
  return indices.reshape(steps, batch_size).astype(jnp.int32)


def normalize(images: jax.Array) -> jax.Array:
  """Pixel values 0..255 (uint8 or float) -> float32 `(x / 255 - 0.5) / 0.25`."""
  return (images.astype(jnp.float32) / 255.0 - _MEAN) / _STD


def augment(key: jax.Array, images: jax.Array, *, pad: int, flip: bool,
            pad_mode: str = "reflect") -> jax.Array:
  """Random pad-and-crop and optional horizontal flip of each image, then `normalize`.

  The semantics of `reinit.data.pipeline.augment_image`: each image is padded by `pad` pixels
  on every side ('reflect' as TF's REFLECT, i.e. without repeating the edge, or 'zero' raw
  pixel value 0), an H x W window is cut at a uniformly drawn offset in [0, 2 * pad] per axis,
  and with `flip` mirrored left-right with probability 1/2.

  Args:
    key: a key; the draws of the B images are independent.
    images: (B, H, W, C) uint8 or float32, pixel values 0..255.
    pad: pixels padded per side (0: no crop; see `reinit.data.pipeline.crop_padding`).
    flip: whether to draw horizontal flips.
    pad_mode: 'reflect' or 'zero'.

  Returns:
    float32 (B, H, W, C), normalized.
  """
  if pad_mode not in PAD_MODES:
    raise ValueError(f"pad_mode={pad_mode!r} is unknown; accepted: {', '.join(PAD_MODES)}")
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  if pad > 0:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=PAD_MODES[pad_mode])
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)
    images = jax.vmap(lambda image, offset: jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (height, width, channels)))(padded, offsets)
  if flip:
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
    images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
  return normalize(images)


def run_batch(data_key: jax.Array, images: jax.Array, labels: jax.Array, members: jax.Array,
              step: int | jax.Array, *, batch_size: int, pad: int = 0, flip: bool = False,
              pad_mode: str = "reflect") -> dict[str, jax.Array]:
  """One run's training batch at global step `step`, read from the shared images on device.

  Args:
    data_key: the run's data key (see the module docstring).
    images: (N, H, W, C) uint8 or float32 0..255, the union of the group's training images.
    labels: (N,) int32.
    members: (n,) int32, the run's examples as indices into `images`.
    step: global step (may be traced).
    batch_size: B.
    pad, flip, pad_mode: the augmentation (`augment`).

  Returns:
    {'image': float32 (B, H, W, C) normalized, 'label': int32 (B,)}.
  """
  order_key, augment_key = data_keys(data_key)
  indices = members[epoch_order(order_key, members.shape[0], batch_size, 1, start=step)[0]]
  return _gather(images, labels, indices, jax.random.fold_in(augment_key, step), pad=pad,
                 flip=flip, pad_mode=pad_mode)


def _gather(images, labels, indices, key, **augmentation) -> dict[str, jax.Array]:
  """The batch of examples `indices` (B,) of the shared images, augmented with `key`."""
  return {"image": augment(key, images[indices], **augmentation),
          "label": labels[indices].astype(jnp.int32)}


# ---------------------------------------------------------------- the group's train loop


def group_train_loop(train_step: Callable, *, steps: int, batch_size: int, pad: int = 0,
                     flip: bool = False, pad_mode: str = "reflect", over_runs: str = "vmap",
                     step_of: Callable[[PyTree], jax.Array] = lambda state: state.step,
                     batch_sharding: jax.sharding.NamedSharding | None = None,
                     runs_axis: str | None = None):
  """The trainer's single-run step, vmapped over the runs and scanned over `steps` steps.

  Args:
    train_step: `(state, batch, learning_rate) -> (state, metrics)` of one run
      (`reinit.train.make_train_step`); batch {'image': (B, H, W, C) f32, 'label': (B,) int32}.
    steps: S, steps per call (a logging window).
    batch_size: B, per run.
    pad, flip, pad_mode: the augmentation (`augment`).
    over_runs: 'vmap' (the runs' steps batched into one: convolutions become grouped ones,
      feature_group_count=R, which XLA:CPU runs far slower than R plain ones) or 'map' (the
      runs one after the other inside the program, `lax.map`: no grouped convolutions).
    step_of: the global step of a run's state (its data stream's position).
    batch_sharding: where a run's batch lives (e.g. split on a mesh's `data` axis: each run
      data-parallel); None: where XLA puts it.
    runs_axis: the mesh axis the run axis is sharded on (with `batch_sharding` and 'vmap':
      the batches' run axis is placed on it).

  Returns:
    A pure function `(states, images, labels, keys, learning_rates, members=None) ->
    (states, metrics)`:
      states: a run's state with a leading run axis R on every leaf (`stack`);
      images: (N, H, W, C) uint8 or float32 0..255, shared by the runs; labels: (N,) int32;
      keys: (R,) data keys, one per run;
      learning_rates: float32 (S,), the rate of each step, shared by the runs;
      members: (R, n) int32, each run's examples as indices into `images`; None: every run
        trains on all N;
      metrics: the step's metrics with leading axes (R, S).
    Jit it with the states donated; shard the run axis on a mesh axis to spread runs over
    devices (the images replicated).
  """
  def run_loop(state, key, members, images, labels, learning_rates):
    order_key, augment_key = data_keys(key)
    start = step_of(state)
    # The window's batches at once: S steps from the state's global step, one call per window.
    orders = members[epoch_order(order_key, members.shape[0], batch_size, steps, start=start)]

    def body(state, xs):
      learning_rate, indices, i = xs
      batch = _gather(images, labels, indices, jax.random.fold_in(augment_key, start + i),
                      pad=pad, flip=flip, pad_mode=pad_mode)
      return train_step(state, _placed(batch, batch_sharding), learning_rate)
    return jax.lax.scan(body, state, (learning_rates, orders, jnp.arange(steps, dtype=jnp.int32)))

  grouped = _over_runs(run_loop, 3, over_runs, runs_axis)  # state, key, members: per run

  def loop(states, images, labels, keys, learning_rates, members=None):
    if members is None:
      members = jnp.broadcast_to(jnp.arange(images.shape[0], dtype=jnp.int32),
                                 (keys.shape[0], images.shape[0]))
    learning_rates = jnp.asarray(learning_rates, jnp.float32)
    if learning_rates.shape != (steps,):
      raise ValueError(f"learning_rates has shape {learning_rates.shape}; expected ({steps},)")
    return grouped(states, keys, members, images, labels, learning_rates)
  return loop


def fed_train_loop(train_step: Callable, *, over_runs: str = "vmap",
                   batch_sharding: jax.sharding.NamedSharding | None = None,
                   runs_axis: str | None = None):
  """`group_train_loop` for batches read on the host (each run's own tf.data stream, as the run
  alone reads it): the trainer's single-run step, vmapped over the runs and scanned over the
  window's batches.

  Args: as `group_train_loop`'s (no data on device, so no batch size or augmentation).

  Returns:
    A pure function `(states, batches, learning_rates) -> (states, metrics)`:
      states: a run's state with a leading run axis R on every leaf;
      batches: {'image': float32 (R, S, B, H, W, C), 'label': int32 (R, S, B)}, run r's next S
        batches of its stream;
      learning_rates: float32 (S,), shared by the runs;
      metrics: the step's metrics with leading axes (R, S).
  """
  def run_loop(state, batches, learning_rates):
    def body(state, xs):
      learning_rate, batch = xs
      return train_step(state, _placed(batch, batch_sharding), learning_rate)
    return jax.lax.scan(body, state, (learning_rates, batches))

  grouped = _over_runs(run_loop, 2, over_runs, runs_axis)  # state, batches: per run

  def loop(states, batches, learning_rates):
    return grouped(states, batches, jnp.asarray(learning_rates, jnp.float32))
  return loop


def _placed(batch: dict, sharding: jax.sharding.NamedSharding | None) -> dict:
  """`batch` constrained to `sharding` (None: where XLA puts it)."""
  return batch if sharding is None else jax.lax.with_sharding_constraint(batch, sharding)


def _over_runs(run_loop: Callable, per_run: int, over_runs: str, runs_axis: str | None):
  """`run_loop` of every run: its first `per_run` arguments carry a leading run axis, the
  others are shared. 'vmap': the runs' steps batched into one (the run axis on mesh axis
  `runs_axis`); 'map': the runs one after the other (`lax.map`)."""
  if over_runs not in OVER_RUNS:
    raise ValueError(f"over_runs={over_runs!r} is unknown; accepted: {', '.join(OVER_RUNS)}")

  def grouped(*args):
    if over_runs == "vmap":
      in_axes = (0,) * per_run + (None,) * (len(args) - per_run)
      return jax.vmap(run_loop, in_axes=in_axes, spmd_axis_name=runs_axis)(*args)
    return jax.lax.map(lambda run: run_loop(*run, *args[per_run:]), args[:per_run])
  return grouped
