"""The trainer: `train_and_evaluate(config, workdir)` runs a method's plan of stages.

Each stage starts with the method's switch (a pure function of the variables, a fresh init and
the method's memory), then trains all layers for the stage's epochs with a fresh optimizer state
and a restarted warmup-cosine schedule. The train and eval steps are jitted once and reused by
every stage: a stage changes values, never shapes, so it never recompiles them.

Data parallelism is `jax.jit` over a 1-D mesh: the batch is sharded on the `data` axis, the
train state is replicated and donated to the step. The same code runs on one CPU or many devices.
"""

import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import flax
import jax
from jax.sharding import NamedSharding, PartitionSpec
import jax.numpy as jnp
import numpy as np
import optax

from reinit import methods
from reinit import models
from reinit import tree as tree_lib

PyTree = Any
RESULTS_FILE = "results.json"
_AUGMENTATIONS = ("none", "crop", "crop_flip")
_COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
  """A user error in the config or the data it names; its message is one line."""


@flax.struct.dataclass
class TrainState:
  """step: global step (int32 scalar); variables: linen variables; opt_state: optax state."""
  step: jax.Array
  variables: PyTree
  opt_state: PyTree


# ---------------------------------------------------------------- config checks


def _positive_int(field: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ConfigError(f"{field}={value!r} is invalid; accepted: a positive integer")


def validate_config(config) -> None:
  """Raises ConfigError (one line naming the field and the accepted values) on bad input."""
  if config.model not in models.MODELS:
    raise ConfigError(f"model={config.model!r} is unknown; accepted: "
                      f"{', '.join(sorted(models.MODELS))}")
  if config.method not in methods.METHODS:
    raise ConfigError(f"method={config.method!r} is unknown; accepted: "
                      f"{', '.join(methods.METHODS)}")
  if config.augment not in _AUGMENTATIONS:
    raise ConfigError(f"augment={config.augment!r} is unknown; accepted: "
                      f"{', '.join(_AUGMENTATIONS)}")
  if config.compute_dtype not in _COMPUTE_DTYPES:
    raise ConfigError(f"compute_dtype={config.compute_dtype!r} is unknown; accepted: "
                      f"{', '.join(_COMPUTE_DTYPES)}")
  examples = config.train_examples
  if examples is not None and examples != -1 and (not isinstance(examples, int) or examples < 1):
    raise ConfigError(f"train_examples={examples!r} is invalid; accepted: a positive number of "
                      "examples, or -1 (or unset) for the whole train split")
  for field in ("batch_size", "eval_batch_size", "epochs_per_stage"):
    _positive_int(field, config[field])
  if config.num_stages != -1:
    _positive_int("num_stages", config.num_stages)
  if not config.learning_rate > 0:
    raise ConfigError(f"learning_rate={config.learning_rate!r} is invalid; accepted: > 0")
  devices = jax.device_count()
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % devices:
      raise ConfigError(f"{field}={config[field]} is invalid; accepted: a multiple of the "
                        f"number of devices ({devices})")
  if config.method == "baseline_long" and config.baseline_long.compare_with not in (
      set(methods.METHODS) - {"baseline_long"}):
    raise ConfigError(f"baseline_long.compare_with={config.baseline_long.compare_with!r} is "
                      f"invalid; accepted: {', '.join(m for m in methods.METHODS if m != 'baseline_long')}")


# ---------------------------------------------------------------- model and optimizer


def create_model(config, num_classes: int):
  """The config's linen module with `num_classes` outputs."""
  return models.get_model(config.model, num_classes=num_classes, width=config.width,
                          dtype=_COMPUTE_DTYPES[config.compute_dtype])


def make_optimizer(config) -> optax.GradientTransformation:
  """SGD (Nesterov) with decoupled-from-schedule weight decay on kernels.

  The learning rate is an injected hyperparameter: the train step sets it from the stage's
  schedule, so every stage (whatever its length or peak) uses the same compiled step.
  """
  def sgd(learning_rate):
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=tree_lib.kernels),
        optax.sgd(learning_rate, momentum=config.momentum or None, nesterov=config.nesterov))
  return optax.inject_hyperparams(sgd)(learning_rate=0.0)


def stage_learning_rates(config, *, peak: float, steps: int, steps_per_epoch: int) -> np.ndarray:
  """Learning rate of each step of a stage: linear warmup, then cosine decay to 0. (steps,) f32."""
  warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), max(steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(steps, 1))
  return np.asarray(jax.vmap(schedule)(jnp.arange(steps)), np.float32)


def cross_entropy(logits, labels, *, num_classes: int, label_smoothing: float):
  """Mean softmax cross-entropy. logits (B, C) f32, labels (B,) int."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def make_train_step(model, tx, *, num_classes: int, label_smoothing: float):
  """`(state, batch, learning_rate) -> (state, metrics)`; batch: image (B,H,W,C), label (B,)."""
  def train_step(state: TrainState, batch, learning_rate):
    def loss_fn(params):
      logits, new_state = model.apply({**state.variables, "params": params}, batch["image"],
                                      train=True, mutable=["batch_stats"])
      loss = cross_entropy(logits, batch["label"], num_classes=num_classes,
                           label_smoothing=label_smoothing)
      return loss, (logits, new_state["batch_stats"])

    params = state.variables["params"]
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    opt_state = optax.tree_utils.tree_set(state.opt_state, learning_rate=learning_rate)
    updates, opt_state = tx.update(grads, opt_state, params)
    variables = {**state.variables, "params": optax.apply_updates(params, updates),
                 "batch_stats": batch_stats}
    metrics = {"loss": loss,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    return TrainState(state.step + 1, variables, opt_state), metrics
  return train_step


def make_eval_step(model, *, num_classes: int):
  """`(variables, batch) -> sums`; batch has image, label and mask (1 real, 0 padding)."""
  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    targets = jax.nn.one_hot(batch["label"], num_classes)
    losses = optax.softmax_cross_entropy(logits, targets)
    correct = jnp.argmax(logits, -1) == batch["label"]
    mask = batch["mask"]
    return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(losses * mask),
            "count": jnp.sum(mask)}
  return eval_step


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class _Runtime:
  """What a run compiles and shards once and reuses in every stage."""
  model: Any
  tx: optax.GradientTransformation
  replicated: NamedSharding
  batch_sharding: NamedSharding
  init: Any
  train_step: Any
  eval_step: Any
  apply_for_moments: Any


def _build_runtime(config, num_classes: int, image_shape) -> _Runtime:
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  model = create_model(config, num_classes)
  tx = make_optimizer(config)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  init = jax.jit(lambda key: model.init(key, dummy, train=False), out_shardings=replicated)
  train_step = jax.jit(
      make_train_step(model, tx, num_classes=num_classes,
                      label_smoothing=config.label_smoothing),
      in_shardings=(replicated, batch_sharding, replicated),
      out_shardings=(replicated, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model, num_classes=num_classes),
                      in_shardings=(replicated, batch_sharding), out_shardings=replicated)
  apply_for_moments = jax.jit(model.apply, static_argnames=("train", "mutable"))
  return _Runtime(model, tx, replicated, batch_sharding, init, train_step, eval_step,
                  apply_for_moments)


def _global_batch(batch, sharding):
  """Host-local numpy batch -> global jax arrays sharded on the `data` axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def evaluate(runtime: _Runtime, variables, dataset) -> dict[str, float]:
  """Accuracy and mean loss over every example of `dataset` (padded batches with a mask)."""
  totals = None
  for batch in dataset.as_numpy_iterator():
    sums = runtime.eval_step(variables, _global_batch(batch, runtime.batch_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {"accuracy": float(totals["correct"]) / count, "loss": float(totals["loss"]) / count,
          "examples": int(count)}


def _write_json_atomically(path: str, payload: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _load_data(config):
  """Dataset info and tf.data pipelines; data problems become one-line ConfigErrors."""
  from reinit import data as data_lib  # pylint: disable=g-import-not-at-top
  try:
    info = data_lib.dataset_info(config)
    train_ds, steps_per_epoch = data_lib.train_dataset(
        config, process_index=jax.process_index(), process_count=jax.process_count())
    calibration_ds, _ = data_lib.train_dataset(
        config, process_index=jax.process_index(), process_count=jax.process_count())
    test_ds = data_lib.eval_dataset(config, split=config.test_split)
    train_eval_ds = data_lib.eval_train_dataset(config)
  except ValueError as e:
    raise ConfigError(str(e).splitlines()[0]) from e
  return info, train_ds, steps_per_epoch, calibration_ds, test_ds, train_eval_ds


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs `config.method` on `config.dataset` and writes `workdir/results.json`.

  Args:
    config: a `configs/benchmark.py` config.
    workdir: where results, logs and TensorBoard summaries go (created if missing).

  Returns:
    The results dict written to `results.json`.

  Raises:
    ConfigError: bad config values or data that is not available (one-line message); nothing
      is written to `workdir` before the config and the data have been checked.
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  validate_config(config)
  info, train_ds, steps_per_epoch, calibration_ds, test_ds, train_eval_ds = _load_data(config)
  runtime = _build_runtime(config, info.num_classes, info.image_shape)
  key = jax.random.key(config.seed)
  init_key, reinit_key = jax.random.split(key)
  dummy = jnp.zeros((1, *info.image_shape), jnp.float32)
  units = tree_lib.layer_order(runtime.model, init_key, dummy, train=False)
  plan = methods.make_plan(config, units)

  os.makedirs(workdir, exist_ok=True)
  is_chief = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  writer.write_hparams({k: v for k, v in config.to_dict().items() if not isinstance(v, dict)})
  logging.info("%s on %s with %s: %d stages, units %s, %d train examples, %d steps/epoch",
               plan.name, config.dataset, config.model, plan.num_stages, units,
               info.train_examples, steps_per_epoch)

  variables = runtime.init(init_key)
  memory = plan.begin(variables)
  switch = jax.jit(plan.switch, static_argnums=0, donate_argnums=1)
  train_iter = train_ds.as_numpy_iterator()
  calibration_iter = calibration_ds.as_numpy_iterator()
  state = None
  stage_results = []
  for k in range(plan.num_stages):
    if k > 0:
      fresh = runtime.init(jax.random.fold_in(reinit_key, k))
      variables = switch(k, state.variables, fresh, memory)
      unit = plan.calibrate_unit(k)
      if unit is not None:
        # One long-lived iterator: a new iterator per stage would reshuffle nondeterministically.
        batches = [jnp.asarray(next(calibration_iter)["image"])
                   for _ in range(config.lw.calibration_batches)]
        variables = methods.calibrate_standardization(
            runtime.apply_for_moments, variables, batches, unit)
    step = jnp.zeros((), jnp.int32) if state is None else state.step
    state = jax.device_put(
        TrainState(step, variables, runtime.tx.init(variables["params"])), runtime.replicated)
    steps = plan.epochs[k] * steps_per_epoch
    learning_rates = stage_learning_rates(config, peak=plan.learning_rates[k], steps=steps,
                                          steps_per_epoch=steps_per_epoch)
    window = []
    for i in range(steps):
      batch = _global_batch(next(train_iter), runtime.batch_sharding)
      state, metrics = runtime.train_step(state, batch, learning_rates[i])
      window.append(metrics)
      if (i + 1) % config.log_every_steps == 0 or i + 1 == steps:
        means = jax.tree.map(lambda *xs: float(np.mean(xs)), *jax.device_get(window))
        writer.write_scalars(int(state.step), {f"train/{n}": v for n, v in means.items()}
                             | {"train/learning_rate": float(learning_rates[i]), "stage": k})
        if not np.isfinite(means["loss"]):
          raise FloatingPointError(f"non-finite training loss at stage {k}, step {i + 1}")
        window = []
    test = evaluate(runtime, state.variables, test_ds)
    train = evaluate(runtime, state.variables, train_eval_ds)
    writer.write_scalars(int(state.step), {"test/accuracy": test["accuracy"],
                                           "test/loss": test["loss"],
                                           "train_eval/accuracy": train["accuracy"],
                                           "train_eval/loss": train["loss"]})
    stage_results.append({"stage": k, "epochs": plan.epochs[k], "steps": steps,
                          "train_accuracy": train["accuracy"], "train_loss": train["loss"],
                          "test_accuracy": test["accuracy"], "test_loss": test["loss"]})
    logging.info("stage %d/%d: train accuracy %.4f, test accuracy %.4f", k + 1,
                 plan.num_stages, train["accuracy"], test["accuracy"])
  writer.flush()

  results = {
      "dataset": config.dataset, "model": config.model, "method": config.method,
      "seed": config.seed, "train_examples": info.train_examples,
      "test_examples": test["examples"], "num_classes": info.num_classes, "units": units,
      "stages": stage_results, "test_accuracy": stage_results[-1]["test_accuracy"],
      "train_accuracy": stage_results[-1]["train_accuracy"],
      "total_epochs": int(sum(plan.epochs)), "devices": jax.device_count(),
      # Stages change values, never programs: each step should compile exactly once.
      "compilations": {"train_step": runtime.train_step._cache_size(),  # pylint: disable=protected-access
                       "eval_step": runtime.eval_step._cache_size()},  # pylint: disable=protected-access
      "wall_time_s": time.perf_counter() - start, "config": config.to_dict(),
  }
  if is_chief:
    _write_json_atomically(os.path.join(workdir, RESULTS_FILE), results)
  return results

