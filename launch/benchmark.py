r"""Speed of one model on this machine: train and eval steps, stage switches, recompiles.

  python -m launch.benchmark --model=simple_cnn --batch_size=128 --image_size=32 \
    [--dataset=digits] [--method=lw] [--width=1.0] [--compute_dtype=float32|bfloat16] \
    [--steps=10] [--repeats=3]

Uses the trainer's public pieces (`reinit.train.build_runtime`, the ahead-of-time compiled
steps of `compile_steps`, `initial_state` and the stage switch `switch_stage`) and reports, after
a warm-up, medians over `--repeats`:
  train_step_ms, train_images_per_s  `--steps` train steps on a device-resident batch;
  eval_images_per_s                  the same for the eval step;
  reinit_transform_ms                one whole stage switch of `--method` (fresh init, switch,
                                     standardization calibration, optimizer reset) until ready,
                                     stages 1..3 in turn;
  input_pipeline_ratio               with --dataset only: images/s of the train step fed by
                                     `reinit.data.Data.train` over images/s fed from device;
  pipeline_images_per_s              with --dataset only: images/s of the pipeline alone,
                                     `--pipeline_batches` numpy batches after one epoch;
                                     `pipeline_over_train_step` is it over train_images_per_s
                                     (below 1: the pipeline is the bottleneck);
  stage_switch_recompiles            compilations of the jitted train and eval steps caused by
                                     three consecutive stage switches of every method of
                                     `reinit.methods.METHODS` (JAX's tracing and compile
                                     events; 0 is the contract). The AOT
                                     compiled steps must also accept every switched state.
plus peak_memory_mb, train_flops_per_image (XLA cost analysis), mfu (on an accelerator of known
peak; null on CPU) and imported_tf. Progress goes to stderr; the LAST stdout line is one JSON
object. Without --dataset the data are synthetic and device-resident and neither TensorFlow
nor TFDS is imported (`"imported_tf": false`). XLA flags: `XLA_FLAGS` plus those
`launch.common` adds, recorded in the JSON. About a minute for simple_cnn (train step ~450
images/s on 2 CPU cores) and four for resnet18; `--check_methods=none` skips the recompile
check.
"""

import dataclasses
import itertools
import json
import os
import resource
import statistics
import sys
import time

from launch import common  # pylint: disable=g-bad-import-order  # sets the env before jax

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import benchmark as benchmark_configs
from reinit import groups
from reinit import methods
from reinit import models
from reinit import train
from reinit import tree as tree_lib
from reinit import validation
from reinit import workdir as workdir_lib

_MODEL = flags.DEFINE_enum("model", "simple_cnn", sorted(models.MODELS), "Architecture.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global train and eval batch size.",
                                   lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Image side in pixels; default 32, or the dataset config's size.",
    lower_bound=1)
_DATASET = flags.DEFINE_string(
    "dataset", None, "Also time the train step fed by this dataset's tf.data pipeline.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir of --dataset.")
_PIPELINE_BATCHES = flags.DEFINE_integer(
    "pipeline_batches", 200, "Training batches of --dataset's pipeline timed alone.",
    lower_bound=1)
_METHOD = flags.DEFINE_enum("method", "lw", methods.METHODS, "Method whose switch is timed.")
_CONV = flags.DEFINE_enum("conv", "auto", list(models.CONV_CHOICES),
                          "Convolution: XLA's, image patches times the kernel (im2col), or "
                          "auto (XLA's for one run, im2col for a group).")
_WIDTH = flags.DEFINE_float("width", 1.0, "Channel multiplier of the model.", lower_bound=0)
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", list(models.COMPUTE_DTYPES),
                                   "Activation dtype (params stay float32).")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed repeat.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; medians are reported.",
                                lower_bound=1)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes of the synthetic data.",
                                    lower_bound=2)
_RUNS_PER_PROGRAM = flags.DEFINE_integer(
    "runs_per_program", 1, "Runs trained by one program (a group, `reinit.groups`): above 1, "
    "times the group's vmapped and scanned train loop on synthetic device-resident data.",
    lower_bound=1)
_OVER_RUNS = flags.DEFINE_enum(
    "over_runs", "vmap", groups.OVER_RUNS, "With runs_per_program > 1: the runs' steps "
    "batched (vmap) or one after the other in the program (map); `reinit.groups`.")
_CHECK_METHODS = flags.DEFINE_list(
    "check_methods", None, "Methods whose stage switches are checked for recompiles; "
    "default: all of reinit.methods.METHODS; 'none': none.")

_SWITCHES = 3  # stage switches 1..3 are timed and checked
_WARMUP_STEPS = 2
# Dense peak FLOP/s per chip, by a lower-case substring of the device kind and the compute
# dtype. float32 convs and matmuls run as TF32 on NVIDIA GPUs at JAX's default precision.
_PEAK_FLOPS = {
    "h100": {"bfloat16": 989e12, "float32": 494e12},
    "h200": {"bfloat16": 989e12, "float32": 494e12},
    "a100": {"bfloat16": 312e12, "float32": 156e12},
    "v100": {"bfloat16": 125e12, "float32": 15.7e12},
    "tpu v4": {"bfloat16": 275e12, "float32": 275e12},
    "tpu v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "tpu v5": {"bfloat16": 459e12, "float32": 459e12},
    "tpu v6": {"bfloat16": 918e12, "float32": 918e12},
}
# clu is not among them: the eval step's `clu.metrics` are pure JAX and import no TensorFlow.
_HEAVY_MODULES = ("tensorflow", "tensorflow_datasets")
# Fields of `reinit.train.Runtime` that no method changes (the plan's own are not shared).
_METHOD_INDEPENDENT = ("init", "opt_init", "train_step", "eval_step")
# `jax.monitoring` events of a (re)trace and of an XLA compilation (persistent-cache hits
# trace too): the names `jax._src.dispatch` gives them.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/backend_compile_duration")


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- setup


def make_config(method: str):
  """The trainer's benchmark config with this benchmark's flags applied; ConfigError if bad."""
  try:
    config = benchmark_configs.get_config(
        f"dataset={_DATASET.value or 'digits'},model={_MODEL.value},method={method}")
  except ValueError as e:  # a dataset name with ',' or '=' in it
    raise train.ConfigError(common.one_line(e)) from e
  config.batch_size = config.eval_batch_size = _BATCH_SIZE.value
  config.width = _WIDTH.value
  config.compute_dtype = _COMPUTE_DTYPE.value
  config.conv = _CONV.value
  if _IMAGE_SIZE.value is not None or not _DATASET.value:
    config.image_size = _IMAGE_SIZE.value or 32
  if _DATA_DIR.value:
    config.data_dir = _DATA_DIR.value
  validation.validate(config)
  return config


def data_spec(config):
  """(image_shape, num_classes, one host batch of the pipeline or None) of the data timed.

  The data package (TensorFlow, TFDS) is imported only for a real dataset."""
  if not _DATASET.value:
    return (config.image_size, config.image_size, 3), _NUM_CLASSES.value, None
  from reinit import data as data_lib  # pylint: disable=g-import-not-at-top
  try:
    data = data_lib.Data(config)
  except ValueError as e:  # not prepared, bad split...: the user's to fix
    raise train.ConfigError(common.one_line(e)) from e
  return (tuple(data.info.image_shape), data.info.num_classes,
          next(data.train().as_numpy_iterator()))


def host_batches(image_shape, num_classes: int, batch_size: int, pipeline_batch=None):
  """Host numpy (train, eval) batches: a pipeline batch, or random images and labels."""
  rng = np.random.default_rng(0)
  batch = pipeline_batch or {
      "image": rng.standard_normal((batch_size, *image_shape), np.float32),
      "label": rng.integers(0, num_classes, (batch_size,), np.int32)}
  train_batch = {"image": batch["image"], "label": batch["label"]}
  return train_batch, {**train_batch, "mask": np.ones((batch_size,), np.float32)}


class Setup:
  """One method's plan with the trainer's runtime, device batches and stage switch.

  `runtimes` (plan optimizer -> runtime), when given, is reused and filled: the
  method-independent jitted functions of the first runtime built are shared by the next methods.
  """

  def __init__(self, config, image_shape, num_classes: int, host_train, host_eval,
               runtimes: dict | None = None):
    self.config = config
    self.keys = train.run_keys(config.seed)
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    units = tree_lib.layer_order(train.create_model(config, num_classes), self.keys.init, dummy,
                                 train=False)
    self.plan = methods.make_plan(config, units)
    self.runtime = train.build_runtime(config, num_classes, image_shape, self.plan)
    if runtimes is not None:
      # These depend on the model and the (wrapped) optimizer, not on the method: methods whose
      # states have one signature share one compilation of each.
      shared = runtimes.setdefault(self.plan.optimizer, self.runtime)
      self.runtime = dataclasses.replace(self.runtime, **{
          field: getattr(shared, field) for field in _METHOD_INDEPENDENT})
    self.train_batch = jax.device_put(host_train, self.runtime.batch_sharding)
    self.eval_batch = jax.device_put(host_eval, self.runtime.batch_sharding)
    self.learning_rate = jax.device_put(jnp.float32(0.01), self.runtime.replicated)
    # The trainer reads calibration batches from a host iterator: so does the benchmark.
    self.calibration = itertools.repeat({"image": host_train["image"]})
    self.steps = None  # `compile`: the AOT compiled steps

  def compile(self, state) -> train.CompiledSteps:
    self.steps = train.compile_steps(self.runtime, state, workdir_lib.abstract(self.train_batch),
                                     workdir_lib.abstract(self.eval_batch))
    return self.steps

  def stage_start(self, k: int, state):
    """The state at the start of stage k >= 1, by the trainer's own `switch_stage`."""
    unit = self.plan.calibrated_unit(k)
    calibration = None if unit is None else (unit, train.calibration_images(
        self.calibration, self.plan.calibration.batches, self.runtime.batch_sharding))
    return train.switch_stage(self.runtime, k, state, self.keys,
                              reset_optimizer=self.config.reset_optimizer,
                              calibration=calibration)

  def initial_state(self):
    return train.initial_state(self.runtime, self.keys)

  @property
  def switches(self) -> range:
    """Stages whose switches run: 1..3, fewer when the plan has fewer stages."""
    return range(1, min(_SWITCHES + 1, self.plan.num_stages))


# ---------------------------------------------------------------- timing


def _durations(run, repeats: int) -> list[float]:
  """Wall-clock seconds of each of `repeats` calls of `run()` (which blocks until ready)."""
  durations = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    durations.append(time.perf_counter() - start)
  return durations


def time_train_steps(setup: Setup, state, steps: int, repeats: int, next_batch=None):
  """(state, seconds per step of each repeat) of the AOT compiled train step, on the
  device-resident batch or, when given, on `next_batch()` for every step."""
  step = setup.steps.train_step
  next_batch = next_batch or (lambda: setup.train_batch)
  holder = [state]

  def run(n):
    current = holder[0]
    for _ in range(n):
      current, _ = step(current, next_batch(), setup.learning_rate)
    holder[0] = jax.block_until_ready(current)

  run(_WARMUP_STEPS)
  durations = _durations(lambda: run(steps), repeats)
  return holder[0], [d / steps for d in durations]


def time_eval_steps(setup: Setup, variables, steps: int, repeats: int) -> list[float]:
  """Seconds per AOT compiled eval step of each repeat, on the device-resident batch."""
  step = setup.steps.eval_step

  def run(n):
    jax.block_until_ready([step(variables, setup.eval_batch) for _ in range(n)])

  run(_WARMUP_STEPS)
  return [d / steps for d in _durations(lambda: run(steps), repeats)]


def time_stage_switches(setup: Setup, state, repeats: int):
  """(state, seconds of each whole stage switch) after one warm-up switch to each stage.

  The warm-up feeds every switched state to the AOT compiled eval and train steps, which
  raise if a switch changed a shape, dtype or sharding. Timed switches then start from the
  same state, stages 1..3 in turn, `repeats` rounds. No durations for one-stage methods.
  """
  for k in setup.switches:
    state = setup.stage_start(k, state)
    setup.steps.eval_step(state.variables, setup.eval_batch)
    state, _ = setup.steps.train_step(state, setup.train_batch, setup.learning_rate)
  state = jax.block_until_ready(state)
  durations = []
  for _ in range(repeats):
    for k in setup.switches:
      durations += _durations(lambda k=k: jax.block_until_ready(setup.stage_start(k, state)), 1)
  return state, durations


# ---------------------------------------------------------------- recompiles


class CompileCounter:
  """Names of the XLA compilations (persistent-cache hits included) done inside `run`."""

  def __init__(self):
    self.names = []
    self._active = False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration
    if self._active and event in _COMPILE_EVENTS:
      self.names.append(kwargs.get("fun_name", "?"))

  def run(self, fn, *args):
    self._active = True
    try:
      return fn(*args)
    finally:
      self._active = False


def switch_recompiles(config, image_shape, num_classes: int, method_names,
                      counter: CompileCounter) -> dict[str, int]:
  """method -> (re)traces and compilations of the jitted (not AOT) train and eval steps that its
  first three stage switches cause: JAX's tracing and compile events while the steps run on
  each switched state. Shapes play no part in this, so it runs at one image per device."""
  batch_size = jax.device_count()
  host_train, host_eval = host_batches(image_shape, num_classes, batch_size)
  runtimes = {}
  counts = {}
  for name in method_names:
    method_config = config.copy_and_resolve_references()
    method_config.update(method=name, batch_size=batch_size, eval_batch_size=batch_size)
    probe = Setup(method_config, image_shape, num_classes, host_train, host_eval, runtimes)

    def run_steps(state, probe=probe):
      jax.block_until_ready(probe.runtime.eval_step(state.variables, probe.eval_batch))
      state, _ = probe.runtime.train_step(state, probe.train_batch, probe.learning_rate)
      return jax.block_until_ready(state)

    state = run_steps(probe.initial_state())  # stage 0 may compile: a new state signature
    compiled_before = len(counter.names)
    for k in probe.switches:
      state = counter.run(run_steps, probe.stage_start(k, state))
    counts[name] = len(counter.names) - compiled_before
  return counts


def _check_methods() -> list[str]:
  names = _CHECK_METHODS.value
  if names is None:
    return list(methods.METHODS)
  if names == ["none"]:
    return []
  unknown = [n for n in names if n not in methods.METHODS]
  if unknown:
    raise train.ConfigError(f"check_methods={','.join(unknown)} is unknown; accepted: "
                            f"{', '.join(methods.METHODS)}, or none")
  return names


# ---------------------------------------------------------------- memory, FLOPs, MFU


def peak_memory_mb(device) -> tuple[float, str]:
  """Peak memory in MiB: the device's where the backend reports it, else the process max RSS."""
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def model_flops_utilization(device, flops_per_step: float, step_s: float, devices: int,
                            compute_dtype: str) -> float | None:
  """Achieved over peak FLOP/s of the devices used; None on CPU or a device of unknown peak."""
  if device.platform == "cpu":
    return None
  kind = device.device_kind.lower()
  for name, peaks in _PEAK_FLOPS.items():
    if name in kind:
      return flops_per_step / step_s / (peaks[compute_dtype] * devices)
  return None


# ---------------------------------------------------------------- input pipeline


def pipeline_images_per_s(train_ds, steps_per_epoch: int, batches: int) -> float:
  """images/s of `batches` numpy batches, after one epoch plus a few batches of warm-up (which
  fill the pipeline's cache)."""
  iterator = train_ds.as_numpy_iterator()
  for _ in range(steps_per_epoch + 5):
    next(iterator)
  start = time.perf_counter()
  images = sum(len(next(iterator)["label"]) for _ in range(batches))
  return images / (time.perf_counter() - start)


def time_pipeline_fed_steps(setup: Setup, config, state, steps: int, repeats: int):
  """(state, seconds per step of each repeat, pipeline images/s): the train step fed by the
  real tf.data pipeline, as the trainer feeds it, after one epoch fills the pipeline's cache;
  and the pipeline alone over `--pipeline_batches` batches."""
  from reinit import data as data_lib  # pylint: disable=g-import-not-at-top
  data = data_lib.Data(config)
  pipeline = pipeline_images_per_s(data.train(), data.steps_per_epoch, _PIPELINE_BATCHES.value)
  iterator = data.train().as_numpy_iterator()
  for _ in range(data.steps_per_epoch + 1):
    next(iterator)
  sharding = setup.runtime.batch_sharding
  state, fed_s = time_train_steps(
      setup, state, steps, repeats,
      next_batch=lambda: train.global_batch(next(iterator), sharding))
  return state, fed_s, pipeline


# ---------------------------------------------------------------- a group of runs


def group_initial_states(config, model, tx, plan, image_shape, runs: int):
  """The stage-0 train states of seeds config.seed .. config.seed + runs - 1, stacked (R, ...).

  Each run's keys, init and method memory are those of the run alone (`train.run_keys`)."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)

  def one(seed):
    keys = train.run_keys(seed)
    variables = model.init(keys.init, dummy, train=False)
    return train.TrainState(jnp.zeros((), jnp.int32), variables, tx.init(variables["params"]),
                            plan.begin(variables, keys.method))
  return jax.jit(jax.vmap(one))(config.seed + jnp.arange(runs))


def group_mesh(runs: int) -> jax.sharding.Mesh:
  """A `runs` mesh of all devices when they divide R (one share of the runs each), else of one."""
  devices = jax.devices()
  count = len(devices) if runs % len(devices) == 0 else 1
  return jax.sharding.Mesh(np.array(devices[:count]), ("runs",))


def group_benchmark() -> dict:
  """Times `reinit.groups.group_train_loop` for R = --runs_per_program runs of --batch_size
  each, --steps steps per call, on synthetic uint8 images held on device (4 batches' worth,
  shared by the runs) with the config's augmentation; returns the JSON-able results."""
  if _DATASET.value:
    raise train.ConfigError("dataset is not timed with runs_per_program > 1; accepted: no "
                            "--dataset (synthetic device-resident data)")
  runs, steps, repeats = _RUNS_PER_PROGRAM.value, _STEPS.value, _REPEATS.value
  config = make_config(_METHOD.value)
  batch, num_classes = config.batch_size, _NUM_CLASSES.value
  image_shape = (config.image_size, config.image_size, 3)
  model = train.create_model(config, num_classes, runs)
  units = tree_lib.layer_order(model, jax.random.key(0), jnp.zeros((1, *image_shape)),
                               train=False)
  plan = methods.make_plan(config, units)
  tx = plan.optimizer(train.make_optimizer(config))
  train_step = train.make_train_step(model, tx, num_classes=num_classes,
                                     label_smoothing=config.label_smoothing)
  pad = max(1, min(4, config.image_size // 8)) if config.augment != "none" else 0
  loop = groups.group_train_loop(train_step, steps=steps, batch_size=batch, pad=pad,
                                 flip=config.augment == "crop_flip",
                                 pad_mode=config.get("pad_mode", "reflect"),
                                 over_runs=_OVER_RUNS.value)

  mesh = group_mesh(runs)
  spread = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("runs"))
  shared = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = np.random.default_rng(0)
  examples = 4 * batch
  images = jax.device_put(rng.integers(0, 256, (examples, *image_shape), np.uint8), shared)
  labels = jax.device_put(rng.integers(0, num_classes, (examples,), np.int32), shared)
  keys = jax.device_put(jax.random.split(jax.random.key(config.seed), runs), spread)
  learning_rates = jax.device_put(np.full((steps,), 0.01, np.float32), shared)
  states = jax.device_put(group_initial_states(config, model, tx, plan, image_shape, runs),
                          spread)
  jitted = jax.jit(loop, in_shardings=(spread, shared, shared, spread, shared),
                   out_shardings=(spread, spread), donate_argnums=0)
  start = time.perf_counter()
  compiled = jitted.lower(workdir_lib.abstract(states), images, labels, keys, learning_rates).compile()
  compile_s = time.perf_counter() - start
  _log(f"compiled the group loop ({runs} runs x {steps} steps) in {compile_s:.1f} s")
  # FLOPs of one run's step: the single-run step's cost analysis (a scan's is not per step).
  one_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), states)
  one_batch = {"image": jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32),
               "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  run_step_flops = train.flops(jax.jit(train_step).lower(
      one_state, one_batch, jax.ShapeDtypeStruct((), jnp.float32)).compile())

  holder = [states]

  def run():
    holder[0], metrics = compiled(holder[0], images, labels, keys, learning_rates)
    jax.block_until_ready((holder[0], metrics))

  run()  # warm-up
  call_s = _durations(run, repeats)
  step_s = statistics.median(call_s) / steps
  _log(f"group step {1000 * step_s:.1f} ms ({runs * batch / step_s:.1f} images/s aggregate)")
  device = jax.devices()[0]
  memory_mb, memory_source = peak_memory_mb(device)
  return {
      "model": _MODEL.value, "batch_size": batch, "image_size": config.image_size,
      "image_shape": list(image_shape), "width": _WIDTH.value, "method": _METHOD.value,
      "compute_dtype": _COMPUTE_DTYPE.value, "conv": models.resolve_conv(_CONV.value, runs),
      "augment": config.augment,
      "dataset": None, "runs_per_program": runs, "over_runs": _OVER_RUNS.value,
      "devices": mesh.size, "backend": jax.default_backend(),
      "device_kind": device.device_kind, "cpu_threads": len(os.sched_getaffinity(0)),
      "steps": steps, "repeats": repeats,
      "aggregate_images_per_s": round(runs * batch / step_s, 2),
      "per_run_images_per_s": round(batch / step_s, 2),
      "group_step_ms": _ms(step_s),
      "group_step_ms_repeats": [_ms(s / steps) for s in call_s],
      "train_flops_per_image": run_step_flops / batch,
      "mfu": model_flops_utilization(device, run_step_flops * runs, step_s, mesh.size,
                                     _COMPUTE_DTYPE.value),
      "peak_memory_mb": round(memory_mb, 1), "peak_memory_source": memory_source,
      "compile_s": round(compile_s, 2),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "imported_tf": any(name in sys.modules for name in _HEAVY_MODULES),
  }


# ---------------------------------------------------------------- main


def _ms(seconds: float | None) -> float | None:
  return None if seconds is None else round(1000 * seconds, 3)


def benchmark() -> dict:
  """Runs every measurement; returns the JSON-able results."""
  counter = CompileCounter()
  check_methods = _check_methods()
  config = make_config(_METHOD.value)
  image_shape, num_classes, pipeline_batch = data_spec(config)
  host_train, host_eval = host_batches(image_shape, num_classes, config.batch_size,
                                       pipeline_batch)
  setup = Setup(config, image_shape, num_classes, host_train, host_eval)
  state = setup.initial_state()
  compiled = setup.compile(state)
  _log(f"compiled the train and eval steps in {compiled.compile_s:.1f} s")

  steps, repeats, batch = _STEPS.value, _REPEATS.value, config.batch_size
  state, train_s = time_train_steps(setup, state, steps, repeats)
  step_s = statistics.median(train_s)
  _log(f"train step {1000 * step_s:.1f} ms ({batch / step_s:.1f} images/s)")
  eval_s = statistics.median(time_eval_steps(setup, state.variables, steps, repeats))
  ratio = pipeline = None
  if _DATASET.value:
    state, fed_s, pipeline = time_pipeline_fed_steps(setup, config, state, steps, repeats)
    ratio = step_s / statistics.median(fed_s)
    _log(f"input pipeline ratio {ratio:.2f}, pipeline alone {pipeline:.1f} images/s")
  state, switch_s = time_stage_switches(setup, state, repeats)
  switch_s = statistics.median(switch_s) if switch_s else None
  _log(f"stage switch {_ms(switch_s)} ms")
  recompiles = switch_recompiles(config, image_shape, num_classes, check_methods, counter)
  _log(f"stage switch recompiles {recompiles}")

  device = jax.devices()[0]
  devices = setup.runtime.replicated.mesh.size
  flops_per_step = compiled.train_step_flops
  memory_mb, memory_source = peak_memory_mb(device)
  return {
      "model": _MODEL.value, "batch_size": batch, "image_size": image_shape[0],
      "image_shape": list(image_shape), "width": _WIDTH.value, "method": _METHOD.value,
      "compute_dtype": _COMPUTE_DTYPE.value, "conv": models.resolve_conv(_CONV.value),
      "dataset": _DATASET.value,
      "devices": devices, "backend": jax.default_backend(), "device_kind": device.device_kind,
      "cpu_threads": len(os.sched_getaffinity(0)), "steps": steps, "repeats": repeats,
      "train_images_per_s": round(batch / step_s, 2),
      "train_step_ms": _ms(step_s),
      "train_step_ms_repeats": [_ms(s) for s in train_s],
      "eval_images_per_s": round(batch / eval_s, 2),
      "reinit_transform_ms": _ms(switch_s),
      "reinit_transform_over_train_step": None if switch_s is None
                                          else round(switch_s / step_s, 3),
      "stage_switch_recompiles": sum(recompiles.values()),
      "stage_switch_recompiles_by_method": recompiles,
      "input_pipeline_ratio": None if ratio is None else round(ratio, 3),
      "pipeline_images_per_s": None if pipeline is None else round(pipeline, 1),
      "pipeline_over_train_step": None if pipeline is None
                                  else round(pipeline * step_s / batch, 3),
      "augment": config.augment if _DATASET.value else None,
      "peak_memory_mb": round(memory_mb, 1), "peak_memory_source": memory_source,
      "train_flops_per_image": flops_per_step / batch,
      "mfu": model_flops_utilization(device, flops_per_step, step_s, devices,
                                     _COMPUTE_DTYPE.value),
      "compile_s": round(compiled.compile_s, 2),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "imported_tf": any(name in sys.modules for name in _HEAVY_MODULES),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    results = group_benchmark() if _RUNS_PER_PROGRAM.value > 1 else benchmark()
  except train.ConfigError as e:
    common.fail(str(e))
  print(json.dumps(results), flush=True)


if __name__ == "__main__":
  sys.exit(common.run_app(main))
