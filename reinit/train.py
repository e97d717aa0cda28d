"""The trainer: `train_and_evaluate(config, workdir)` runs a method's plan of stages.

Each stage starts with the method's switch (a pure function of the variables, a fresh init, the
method's memory and a key), then trains all layers for the stage's epochs with a fresh (or
partly reset) optimizer state and a restarted (or continued) warmup-cosine schedule. The train
and eval steps are compiled once, ahead of time, and reused by every stage: a stage changes
values, never shapes, so it cannot recompile them.

Data parallelism is `jax.jit` over a 1-D mesh: the batch is sharded on the `data` axis, the
train state is replicated and donated to the step. The same code runs on one CPU, many devices
or many hosts (after `jax.distributed.initialize()`, each process feeds its slice of the batch).

A run is a pure function of its config and seed on a given device count. It checkpoints with
orbax (every `checkpoint_every_steps` and at every stage end) and resumes from the latest good
checkpoint when started again with the same config and workdir, ending with the same results.
"""

import copy
import dataclasses
import functools
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
from reinit import preemption
from reinit import provenance
from reinit import transforms
from reinit import tree as tree_lib

PyTree = Any
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
VARIABLES_DIR = "variables"  # WORKDIR/variables/{init,final}: orbax checkpoints of `variables`
_AUGMENTATIONS = ("none", "crop", "crop_flip")
_COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_OPTIMIZER_POLICIES = ("fresh", "masked")
# Fields that change how a run is logged or checkpointed, not what it computes.
_BOOKKEEPING_FIELDS = ("log_every_steps", "checkpoint_every_steps", "data_dir")


class ConfigError(ValueError):
  """A user error in the config, the workdir or the data they name; a one-line message."""


class TrainingDiverged(FloatingPointError):
  """The training loss became non-finite; the message names the stage and step."""


class Preempted(Exception):
  """SIGTERM or SIGUSR1 arrived: a checkpoint of `step` is written; run again to resume."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


@flax.struct.dataclass
class TrainState:
  """The whole training state; a pytree of arrays, checkpointed as it is.

  step: global step (int32 scalar). variables: linen variables (params, batch_stats, norm).
  opt_state: optax state. memory: the method's bookkeeping (`methods.Plan.begin`).
  """
  step: jax.Array
  variables: PyTree
  opt_state: PyTree
  memory: PyTree


# ---------------------------------------------------------------- config checks


def _positive_int(field: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ConfigError(f"{field}={value!r} is invalid; accepted: a positive integer")


def _choice(field: str, value, accepted) -> None:
  if value not in accepted:
    raise ConfigError(f"{field}={value!r} is unknown; accepted: {', '.join(accepted)}")


def num_devices(config) -> int:
  """Devices the run uses: `config.num_devices`, or all when -1."""
  requested = config.get("num_devices", -1)
  return jax.device_count() if requested == -1 else requested


def validate_config(config) -> None:
  """Raises ConfigError (one line naming the field and the accepted values) on bad input."""
  _choice("model", config.model, sorted(models.MODELS))
  _choice("method", config.method, methods.METHODS)
  _choice("augment", config.augment, _AUGMENTATIONS)
  _choice("compute_dtype", config.compute_dtype, tuple(_COMPUTE_DTYPES))
  _choice("reset_optimizer", config.reset_optimizer, _OPTIMIZER_POLICIES)
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
  requested = config.get("num_devices", -1)
  if requested != -1 and not (isinstance(requested, int) and 1 <= requested <= jax.device_count()):
    raise ConfigError(f"num_devices={requested!r} is invalid; accepted: -1 (all) or 1.."
                      f"{jax.device_count()}")
  devices = num_devices(config)
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % devices:
      raise ConfigError(f"{field}={config[field]} is invalid; accepted: a multiple of the "
                        f"number of devices ({devices})")


# ---------------------------------------------------------------- model and optimizer


def create_model(config, num_classes: int):
  """The config's linen module with `num_classes` outputs."""
  return models.get_model(config.model, num_classes=num_classes, width=config.width,
                          dtype=_COMPUTE_DTYPES[config.compute_dtype])


def make_optimizer(config) -> optax.GradientTransformation:
  """SGD (Nesterov) with weight decay on kernels.

  The learning rate is an injected hyperparameter: the train step sets it from the stage's
  schedule, so every stage (whatever its length or peak) uses the same compiled step.
  """
  def sgd(learning_rate):
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=tree_lib.kernels),
        optax.sgd(learning_rate, momentum=config.momentum or None, nesterov=config.nesterov))
  return optax.inject_hyperparams(sgd)(learning_rate=0.0)


def warmup_cosine(config, *, peak: float, steps: int, steps_per_epoch: int) -> np.ndarray:
  """Learning rate of each of `steps` steps: linear warmup, then cosine decay to 0. (steps,) f32."""
  warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), max(steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(steps, 1))
  return np.asarray(jax.vmap(schedule)(jnp.arange(steps)), np.float32)


def stage_learning_rates(config, plan: methods.Plan, steps_per_epoch: int) -> list[np.ndarray]:
  """Per stage, the learning rate of each of its steps.

  With `restart_schedule`, every stage runs its own warmup + cosine at its own peak; without,
  one schedule spans all stages (each stage's peak then scales its slice).
  """
  steps = [e * steps_per_epoch for e in plan.epochs]
  if config.restart_schedule:
    return [warmup_cosine(config, peak=peak, steps=n, steps_per_epoch=steps_per_epoch)
            for peak, n in zip(plan.learning_rates, steps)]
  whole = warmup_cosine(config, peak=1.0, steps=sum(steps), steps_per_epoch=steps_per_epoch)
  bounds = np.cumsum([0] + steps)
  return [whole[a:b] * peak for a, b, peak in zip(bounds[:-1], bounds[1:], plan.learning_rates)]


def cross_entropy(logits, labels, *, num_classes: int, label_smoothing: float):
  """Mean softmax cross-entropy. logits (B, C) f32, labels (B,) int."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def _held_at_zero(tree, keep):
  return jax.tree.map(lambda x, k: jnp.where(k, x, jnp.zeros_like(x)), tree, keep)


def make_train_step(model, tx, *, num_classes: int, label_smoothing: float,
                    holds_zeros: bool = False):
  """`(state, batch, learning_rate) -> (state, metrics)`; batch: image (B,H,W,C), label (B,).

  With `holds_zeros`, params where `state.memory['keep']` is False get no gradient and stay
  exactly zero (DSD's sparse stage).
  """
  def train_step(state: TrainState, batch, learning_rate):
    def loss_fn(params):
      logits, new_state = model.apply({**state.variables, "params": params}, batch["image"],
                                      train=True, mutable=["batch_stats"])
      loss = cross_entropy(logits, batch["label"], num_classes=num_classes,
                           label_smoothing=label_smoothing)
      return loss, (logits, new_state["batch_stats"])

    params = state.variables["params"]
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if holds_zeros:
      grads = _held_at_zero(grads, state.memory["keep"])
    opt_state = optax.tree_utils.tree_set(state.opt_state, learning_rate=learning_rate)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if holds_zeros:
      params = _held_at_zero(params, state.memory["keep"])
    variables = {**state.variables, "params": params, "batch_stats": batch_stats}
    metrics = {"loss": loss,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    return state.replace(step=state.step + 1, variables=variables, opt_state=opt_state), metrics
  return train_step


def make_eval_step(model, *, num_classes: int):
  """`(variables, batch) -> sums` over the real examples of a padded batch.

  The batch has image, label and mask (1 real, 0 padding), and may carry `true_label` and
  `corrupted` (label noise): then the sums also count corrupted examples predicted as their
  (wrong) training label, i.e. memorized, and clean examples predicted right.
  """
  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    targets = jax.nn.one_hot(batch["label"], num_classes)
    losses = optax.softmax_cross_entropy(logits, targets)
    correct = jnp.argmax(logits, -1) == batch["label"]
    mask = batch["mask"]
    sums = {"correct": jnp.sum(correct * mask), "loss": jnp.sum(losses * mask),
            "count": jnp.sum(mask)}
    if "corrupted" in batch:
      corrupted = batch["corrupted"] * mask
      sums |= {"corrupted": jnp.sum(corrupted),
               "memorized": jnp.sum(correct * corrupted),
               "clean_correct": jnp.sum(correct * (mask - corrupted))}
    return sums
  return eval_step


# ---------------------------------------------------------------- what a run compiles once


@dataclasses.dataclass
class Runtime:
  """The model, optimizer, shardings and jitted functions of a run, shared by all its stages.

  `train_step` and `eval_step` are ahead-of-time compiled (`compile_steps`): a stage that
  changed a shape or a sharding would fail loudly instead of recompiling silently.
  """
  model: Any
  tx: optax.GradientTransformation
  replicated: NamedSharding
  batch_sharding: NamedSharding
  init: Any  # key -> variables, replicated
  opt_init: Any  # params -> optimizer state, replicated
  train_step: Any
  eval_step: Any
  unit_moments: Any  # (variables, images, unit) -> (mean, var); `methods.unit_moments`
  begin: Any  # the plan's begin, jitted
  switch: Any  # the plan's switch, jitted once for all stages (k is traced)
  reset_opt_state: Any
  holds_zeros: bool
  compiled_train_step: Any = None
  compiled_eval_step: Any = None


def rarely_run_jit(fun, **kwargs):
  """`jax.jit` for functions run a few times per run (init, stage switches): on CPU, XLA's
  backend optimizations cost seconds of compile time (5 s for an init) and save nothing."""
  if jax.default_backend() == "cpu":
    kwargs["compiler_options"] = {"xla_backend_optimization_level": 0}
  return jax.jit(fun, **kwargs)


def data_mesh(config) -> jax.sharding.Mesh:
  """The run's 1-D `data` mesh, each process's devices side by side in process order.

  Process p then holds rows [p * B/P, (p + 1) * B/P) of every global batch of B, P processes:
  the rows its input pipeline feeds (`reinit.data.train_dataset`).
  """
  mesh = jax.make_mesh((num_devices(config),), ("data",),
                       devices=jax.devices()[:num_devices(config)])
  # Stable: within a process, make_mesh's (topology-aware) order stays.
  devices = sorted(mesh.devices.flat, key=lambda d: d.process_index)
  return jax.sharding.Mesh(np.array(devices), ("data",))


def build_runtime(config, num_classes: int, image_shape, plan: methods.Plan) -> Runtime:
  """Mesh, shardings, model, optimizer and the jitted functions of a run of `plan`."""
  holds_zeros = plan.holds_zeros
  mesh = data_mesh(config)
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  model = create_model(config, num_classes)
  tx = make_optimizer(config)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  init = rarely_run_jit(lambda key: model.init(key, dummy, train=False),
                        out_shardings=replicated)
  train_step = jax.jit(
      make_train_step(model, tx, num_classes=num_classes,
                      label_smoothing=config.label_smoothing, holds_zeros=holds_zeros),
      in_shardings=(replicated, batch_sharding, replicated),
      out_shardings=(replicated, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model, num_classes=num_classes),
                      in_shardings=(replicated, batch_sharding), out_shardings=replicated)
  # Fully optimized, unlike the other stage-switch functions: it runs forward passes of the
  # model on training batches, up to the calibrated unit (one compile per unit).
  unit_moments = jax.jit(functools.partial(methods.unit_moments, model.apply),
                         static_argnums=2)
  opt_init = rarely_run_jit(tx.init, out_shardings=replicated)
  return Runtime(model, tx, replicated, batch_sharding, init, opt_init, train_step, eval_step,
                 unit_moments, rarely_run_jit(plan.begin), rarely_run_jit(plan.switch),
                 rarely_run_jit(transforms.reset_opt_state), holds_zeros)


def compile_steps(runtime: Runtime, state: TrainState, train_batch, eval_batch) -> dict:
  """Compiles the train and eval steps for these shapes; returns seconds and FLOPs per step."""
  start = time.perf_counter()
  lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=runtime.replicated)
  runtime.compiled_train_step = runtime.train_step.lower(state, train_batch, lr).compile()
  runtime.compiled_eval_step = runtime.eval_step.lower(state.variables, eval_batch).compile()
  # XLA's cost analysis counts one device's share of the data-parallel step.
  devices = runtime.replicated.mesh.size
  return {"compile_s": time.perf_counter() - start,
          "train_step_flops": _flops(runtime.compiled_train_step) * devices}


def _flops(compiled) -> float:
  """FLOPs of one call of a compiled function, from XLA's cost analysis (NaN if unknown)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


def _global_batch(batch, sharding):
  """Host-local numpy batch -> global jax arrays sharded on the `data` axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def _abstract_batch(dataset, sharding, process_count: int):
  """Global shapes of a host-local batch of `dataset`, for ahead-of-time compilation."""
  def spec(x):
    return jax.ShapeDtypeStruct((x.shape[0] * process_count, *x.shape[1:]),
                                x.dtype.as_numpy_dtype, sharding=sharding)
  return jax.tree.map(spec, dataset.element_spec)


_RESIDENT_EVAL_BYTES = 256 * 2**20


class EvalSet:
  """An evaluation split as global batches; kept on the devices when it is small.

  Evaluating after every stage re-reads the split; a split under 256 MiB per process is kept
  from its first pass on, which saves the tf.data start-up and the host-to-device copies at
  every later stage end.
  """

  def __init__(self, dataset, sharding):
    self._dataset, self._sharding = dataset, sharding
    self._resident: list | None = None
    self._too_big = False

  def __iter__(self):
    if self._resident is not None:
      yield from self._resident
      return
    kept, size = [], 0
    for batch in self._dataset.as_numpy_iterator():
      size += sum(x.nbytes for x in batch.values())
      self._too_big |= size > _RESIDENT_EVAL_BYTES
      batch = _global_batch(batch, self._sharding)
      if not self._too_big:
        kept.append(batch)
      yield batch
    if not self._too_big:
      self._resident = kept


def evaluate(runtime: Runtime, variables, eval_set: EvalSet) -> dict[str, float]:
  """Accuracy and mean loss over every example of `eval_set` (padded batches with a mask)."""
  totals = None
  for batch in eval_set:
    sums = runtime.compiled_eval_step(variables, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  out = {"accuracy": float(totals["correct"]) / count, "loss": float(totals["loss"]) / count,
         "examples": int(count)}
  corrupted = float(totals.get("corrupted", 0.0))
  if corrupted:
    out |= {"memorized": float(totals["memorized"]) / corrupted,
            "clean_accuracy": float(totals["clean_correct"]) / (count - corrupted)}
  return out


# ---------------------------------------------------------------- workdir and checkpoints


def workdir_path(workdir: str, *parts: str):
  """`workdir/parts...` as an `etils.epath.Path`: local folders and gs:// alike."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(workdir).joinpath(*parts)


def _absolute(workdir: str) -> str:
  """Orbax wants absolute paths; URLs (gs://...) already are."""
  return workdir if "://" in workdir else os.path.abspath(workdir)


def write_json_atomically(path, payload: dict) -> None:
  """Writes JSON to `path` (an `epath.Path`) through a temporary file: never half-written."""
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
  tmp.rename(path)


def _read_json(path) -> dict:
  return json.loads(path.read_text())


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


# What may lie in a workdir before reinit claims it (writes its config.json, the first thing
# it writes there): hidden files (.DS_Store, .nfs*) and the logs a scheduler or a shell
# redirection puts next to a run (slurm-%j.out).
_HIDDEN = "."
_LOG_SUFFIXES = (".log", ".out", ".err")


def foreign_entries(workdir: str) -> list[str]:
  """Sorted names in `workdir` other than hidden files and logs: files reinit did not write
  when the folder has no config.json (every run writes its config.json first). [] when the
  folder does not exist."""
  path = workdir_path(workdir)
  if not path.exists():
    return []
  return sorted(entry.name for entry in path.iterdir()
                if not entry.name.startswith(_HIDDEN)
                and not (entry.name.endswith(_LOG_SUFFIXES) and entry.is_file())
                # Another process of this run writing the config (write_json_atomically).
                and entry.name != CONFIG_FILE + ".tmp")


def claim_workdir(config, workdir: str) -> None:
  """Records the config in `workdir`, or checks it equals the one recorded there.

  Raises:
    ConfigError: the workdir holds a run with a different config (names the differing fields),
      or files reinit did not write and no config.json (`foreign_entries`: e.g. results.json
      copied from elsewhere); nothing in it is touched.
  """
  path = workdir_path(workdir, CONFIG_FILE)
  current = json.loads(json.dumps(config.to_dict()))
  if path.exists():
    recorded = _read_json(path)
    a, b = _flat(recorded), _flat(current)
    differing = sorted(k for k in set(a) | set(b)
                       if a.get(k) != b.get(k) and k not in _BOOKKEEPING_FIELDS)
    if differing:
      raise ConfigError(f"workdir={workdir!r} holds a run with a different config (fields: "
                        f"{', '.join(differing)}); accepted: the same config to resume it, or "
                        "another workdir")
    return
  foreign = foreign_entries(workdir)
  if foreign:
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if foreign[3:] else "")
    raise ConfigError(f"workdir={workdir!r} holds files reinit did not write ({shown}) and no "
                      f"{CONFIG_FILE}; accepted: a new or empty folder, or the workdir of a run "
                      "with this config")
  path.parent.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    write_json_atomically(path, current)


def _checkpoint_manager(workdir: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.CheckpointManager(
      os.path.join(_absolute(workdir), CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True))


def _save_checkpoint(manager, state: TrainState, progress: dict) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # A copy: the save finishes in the background while the loop goes on updating `progress`.
  manager.save(int(progress["global_step"]), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(copy.deepcopy(progress))),
      force=True)


def _abstract(tree):
  """Shapes, dtypes and shardings of a tree of arrays: what orbax restores into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _restore_latest(manager, abstract_state):
  """(state, progress) of the newest checkpoint that restores, or None; warns on bad ones."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()))
      steps = {step, int(restored.state.step), int(restored.progress["global_step"])}
      if len(steps) != 1:
        raise ValueError(f"inconsistent checkpoint: directory, state and progress steps {steps}")
      return restored.state, restored.progress
    except Exception as e:  # pylint: disable=broad-except
      # Moved aside, not deleted: training will write this step again, and the bad files may
      # matter to whoever investigates.
      directory = workdir_path(str(manager.directory))
      aside = directory.parent / "corrupt_checkpoints"
      if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        (directory / str(step)).rename(aside / f"{step}-{int(time.time())}")
      manager.reload()
      logging.warning("checkpoint at step %d is unreadable (%s); moved to %s, trying the "
                      "previous one", step,
                      str(e).splitlines()[0] if str(e) else type(e).__name__, aside)
  return None


def _save_variables(workdir: str, name: str, variables) -> None:
  """Writes `variables` to WORKDIR/variables/NAME; every process takes part (orbax syncs)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(_absolute(workdir), VARIABLES_DIR, name)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, variables, force=True)
  checkpointer.wait_until_finished()


# ---------------------------------------------------------------- the run


def _load_data(config):
  """Dataset info and tf.data pipelines; data problems become one-line ConfigErrors."""
  from reinit import data as data_lib  # pylint: disable=g-import-not-at-top
  try:
    data = data_lib.Data(config, process_index=jax.process_index(),
                         process_count=jax.process_count())
    # Two independent datasets over the same stream: training and LW's calibration batches.
    return (data.info, data.train(), data.steps_per_epoch, data.train(),
            data.eval(config.test_split), data.train_eval())
  except ValueError as e:
    raise ConfigError(str(e).splitlines()[0]) from e


def _run_keys(seed: int):
  """Keys of a run: initialization, the fresh draws of stage switches, the methods' own."""
  init_key, fresh_key, method_key = jax.random.split(jax.random.key(seed), 3)
  return init_key, fresh_key, method_key


def _calibration_batches(calibration_iter, count: int, batch_sharding: NamedSharding):
  """The next `count` global training batches' images, (count, B, H, W, C), batch on `data`.

  Each process contributes its rows, as to a train step: the statistics computed from them are
  those of the global batches, the same in every process and for any process count.
  """
  local = np.stack([next(calibration_iter)["image"] for _ in range(count)])
  sharding = NamedSharding(batch_sharding.mesh, PartitionSpec(None, "data"))
  return jax.make_array_from_process_local_data(sharding, local)


def _stage_start(runtime: Runtime, plan: methods.Plan, config, k: int, state: TrainState | None,
                 variables, calibration_iter, keys) -> TrainState:
  """The state at the start of stage k: the switch, calibration and the optimizer policy."""
  _, fresh_key, method_key = keys
  if k == 0:
    memory = runtime.begin(variables, method_key)
    return jax.device_put(TrainState(jnp.zeros((), jnp.int32), variables,
                                     runtime.opt_init(variables["params"]), memory),
                          runtime.replicated)
  fresh = runtime.init(jax.random.fold_in(fresh_key, k))
  switched = runtime.switch(jnp.int32(k), state.variables, fresh, state.memory,
                            jax.random.fold_in(method_key, k))
  variables = switched.variables
  unit = plan.calibrate_unit(k)
  if unit is not None:
    images = _calibration_batches(calibration_iter, config.lw.calibration_batches,
                                  runtime.batch_sharding)
    variables = methods.set_standardization(variables, unit,
                                            *runtime.unit_moments(variables, images, unit))
  if config.reset_optimizer == "fresh":
    opt_state = runtime.opt_init(variables["params"])
  else:
    opt_state = runtime.reset_opt_state(state.opt_state, switched.touched)
  return jax.device_put(TrainState(state.step, variables, opt_state, switched.memory),
                        runtime.replicated)


def _stop_preempted(manager, workdir: str, step: int):
  """Waits for the checkpoint of `step` to be written, then raises `Preempted`."""
  manager.wait_until_finished()
  logging.warning("preempted: checkpoint of step %d written; stopping", step)
  raise Preempted(f"preempted at step {step}: its checkpoint is in {workdir}/{CHECKPOINT_DIR}; "
                  "run the same command again to resume", step)


def _window_means(window: list[dict], average) -> dict[str, float]:
  """Means over the steps of a logging window, as clu `Average` metrics of the step values."""
  return {name: float(average.from_model_output(np.asarray([m[name] for m in window]))
                      .compute()) for name in window[0]}


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs `config.method` on `config.dataset` and writes `workdir/results.json`.

  Started again with the same config and workdir, it resumes from the newest readable
  checkpoint and ends with the same results as an unbroken run (`resumed_from` lists the steps
  restored); a finished run returns its results.

  Args:
    config: a `configs/benchmark.py` config.
    workdir: results, config, checkpoints, TensorBoard summaries (created if missing).

  Returns:
    The results dict written to `results.json`.

  Raises:
    ConfigError: bad config values, data that is not available, or a workdir that holds another
      config (one-line message); nothing in `workdir` is written or changed before these checks.
    TrainingDiverged: a non-finite training loss; the last good checkpoint stays.
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import metrics as clu_metrics  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  validate_config(config)
  results_path = workdir_path(workdir, RESULTS_FILE)
  info, train_ds, steps_per_epoch, calibration_ds, test_ds, train_eval_ds = _load_data(config)
  keys = _run_keys(config.seed)
  dummy = jnp.zeros((1, *info.image_shape), jnp.float32)
  units = tree_lib.layer_order(create_model(config, info.num_classes), keys[0], dummy,
                               train=False)
  try:
    plan = methods.make_plan(config, units)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  claim_workdir(config, workdir)
  if results_path.exists():
    logging.info("%s is finished; returning its results", workdir)
    return _read_json(results_path)

  runtime = build_runtime(config, info.num_classes, info.image_shape, plan)
  is_chief = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  manager = _checkpoint_manager(workdir)
  learning_rates = stage_learning_rates(config, plan, steps_per_epoch)
  total_steps = sum(len(lrs) for lrs in learning_rates)
  logging.info("%s on %s with %s: %d stages, units %s, %d train examples, %d steps/epoch",
               plan.name, config.dataset, config.model, plan.num_stages, units,
               info.train_examples, steps_per_epoch)

  # Stage 0's state; its shapes are those of every stage, so it also serves to compile.
  initial = runtime.init(keys[0])
  state = _stage_start(runtime, plan, config, 0, None, initial, None, keys)
  timing = compile_steps(runtime, state,
                         _abstract_batch(train_ds, runtime.batch_sharding, jax.process_count()),
                         _abstract_batch(test_ds, runtime.batch_sharding, jax.process_count()))
  progress = {"stage": 0, "step_in_stage": 0, "global_step": 0, "calibrations": 0,
              "stage_results": [], "resumed_from": [], "train_s": 0.0, "eval_s": 0.0}
  restored = _restore_latest(manager, _abstract(state))
  if restored is not None:
    state, progress = restored
    state = jax.device_put(state, runtime.replicated)
    progress["resumed_from"] = progress["resumed_from"] + [progress["global_step"]]
    logging.info("resumed from step %d (stage %d)", progress["global_step"], progress["stage"])
  else:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
    _save_variables(workdir, "init", state.variables)

  test_set = EvalSet(test_ds, runtime.batch_sharding)
  train_eval_set = EvalSet(train_eval_ds, runtime.batch_sharding)
  # The data streams are pure functions of the config: skipping what was consumed restores them.
  train_iter = train_ds.skip(progress["global_step"]).as_numpy_iterator()
  calibration_iter = calibration_ds.skip(
      progress["calibrations"] * config.lw.calibration_batches).as_numpy_iterator()
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  checkpoint_every = config.checkpoint_every_steps
  # SIGTERM/SIGUSR1 from here on: checkpoint the current step and stop (`preemption`).
  notice = preemption.Notice()
  preempted_at_stage_end = False

  try:
    for k in range(progress["stage"], plan.num_stages):
      if progress["step_in_stage"] == 0 and k > 0:
        state = _stage_start(runtime, plan, config, k, state, None, calibration_iter, keys)
        progress["calibrations"] += int(plan.calibrate_unit(k) is not None)
      lrs = learning_rates[k]
      window = []
      train_start = time.perf_counter()
      for i in range(progress["step_in_stage"], len(lrs)):
        batch = _global_batch(next(train_iter), runtime.batch_sharding)
        state, metrics = runtime.compiled_train_step(state, batch, lrs[i])
        # Device scalars, fetched only when logging: no host sync or eager op per step.
        window.append(metrics)
        step = progress["global_step"] + 1
        report(step)
        at_log = (i + 1) % config.log_every_steps == 0 or i + 1 == len(lrs)
        at_checkpoint = checkpoint_every > 0 and step % checkpoint_every == 0 and i + 1 < len(lrs)
        if at_log or at_checkpoint:
          means = _window_means(jax.device_get(window), clu_metrics.Average)
          if not np.isfinite(means["loss"]):
            raise TrainingDiverged(f"non-finite training loss at stage {k}, step {i + 1} of the "
                                   f"stage (global step {step}); the last good checkpoint stays "
                                   f"in {workdir}/{CHECKPOINT_DIR}")
          if at_log:
            writer.write_scalars(step, {f"train/{n}": v for n, v in means.items()}
                                 | {"train/learning_rate": float(lrs[i]), "stage": k})
            window = []
        progress.update(step_in_stage=i + 1, global_step=step)
        if at_checkpoint:
          _save_checkpoint(manager, state, progress)
        if notice.reached(step):
          if i + 1 == len(lrs):  # the stage end below checkpoints this step
            preempted_at_stage_end = True
            continue
          if not at_checkpoint:
            _save_checkpoint(manager, state, progress)
          _stop_preempted(manager, workdir, step)
      progress["train_s"] += time.perf_counter() - train_start

      eval_start = time.perf_counter()
      with report.timed("eval"):
        test = evaluate(runtime, state.variables, test_set)
        train = evaluate(runtime, state.variables, train_eval_set)
      progress["eval_s"] += time.perf_counter() - eval_start
      writer.write_scalars(progress["global_step"], {
          "test/accuracy": test["accuracy"], "test/loss": test["loss"],
          "train_eval/accuracy": train["accuracy"], "train_eval/loss": train["loss"]})
      progress["stage_results"].append({
          "stage": k, "epochs": plan.epochs[k], "steps": len(lrs),
          "learning_rate": plan.learning_rates[k],
          "train_accuracy": train["accuracy"], "train_loss": train["loss"],
          "test_accuracy": test["accuracy"], "test_loss": test["loss"],
          "test_examples": test["examples"],
        # Under label noise: the fraction of corrupted training examples fitted to their wrong
        # label, and the accuracy on the clean ones.
        **{f"train_{k}": train[k] for k in ("memorized", "clean_accuracy") if k in train}})
      logging.info("stage %d/%d: train accuracy %.4f, test accuracy %.4f", k + 1,
                   plan.num_stages, train["accuracy"], test["accuracy"])
      progress.update(stage=k + 1, step_in_stage=0)
      _save_checkpoint(manager, state, progress)
      # A notice during the evaluation stops here, at the checkpoint just written; a run
      # whose last stage is done finishes instead.
      if k + 1 < plan.num_stages and (preempted_at_stage_end or (
          notice.signal is not None and not notice.multiprocess)):
        _stop_preempted(manager, workdir, progress["global_step"])
  finally:
    # Also on errors and interrupts: an in-flight asynchronous save is completed, not left
    # half-written.
    manager.wait_until_finished()
    notice.restore()
  writer.flush()

  stages = progress["stage_results"]
  results = {
      "dataset": config.dataset, "model": config.model, "method": config.method,
      "seed": config.seed, "train_examples": info.train_examples,
      "test_examples": stages[-1]["test_examples"], "num_classes": info.num_classes,
      "units": units, "stages": stages, "test_accuracy": stages[-1]["test_accuracy"],
      "train_accuracy": stages[-1]["train_accuracy"],
      "total_epochs": int(sum(plan.epochs)), "devices": num_devices(config),
      "compute": {
          "total_epochs": int(sum(plan.epochs)), "train_steps": total_steps,
          "examples_seen": total_steps * config.batch_size,
          "train_step_flops": timing["train_step_flops"],
          "train_flops": timing["train_step_flops"] * total_steps,
      },
      "time_s": {"compile": timing["compile_s"], "train": progress["train_s"],
                 "eval": progress["eval_s"]},
      "resumed_from": progress["resumed_from"],
      "wall_time_s": time.perf_counter() - start, "config": config.to_dict(),
      # Versions, code commit, devices and XLA flags: what produced these numbers.
      "provenance": provenance.collect(),
  }
  _save_variables(workdir, "final", state.variables)
  if is_chief:
    write_json_atomically(results_path, results)
  return results


@dataclasses.dataclass(frozen=True)
class FinishedRun:
  """A finished run read back from its workdir: what the analyses need."""
  config: Any  # ml_collections.ConfigDict
  results: dict
  model: Any  # the linen module
  init_variables: PyTree
  final_variables: PyTree


def load_run(workdir: str) -> FinishedRun:
  """Reads `results.json` and the init/final variables a finished run wrote to `workdir`."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = workdir_path(workdir, RESULTS_FILE)
  if not path.exists():
    raise ConfigError(f"workdir={workdir!r} holds no finished run ({RESULTS_FILE} is missing)")
  results = _read_json(path)
  config = ml_collections.ConfigDict(results["config"])
  model = create_model(config, results["num_classes"])
  root = os.path.join(_absolute(workdir), VARIABLES_DIR)
  # Onto the saved shardings where this process has those devices; else (a multi-host run read
  # on one machine) onto one local device.
  restore = functools.partial(
      ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore,
      args=ocp.args.StandardRestore(
          fallback_sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0])))
  init_variables = restore(os.path.join(root, "init"))
  final_variables = restore(os.path.join(root, "final"))
  return FinishedRun(config, results, model, init_variables, final_variables)
