"""What a run compiles once and how it moves between stages: the mesh, the jitted and
ahead-of-time compiled steps, global batches, the initial state and the stage switch.

Data parallelism is `jax.jit` over a 1-D mesh: the batch is sharded on the `data` axis, the
train state is replicated and donated to the step. The same code runs on one CPU, many devices
or many hosts (after `jax.distributed.initialize()`, each process feeds its slice of the batch).
"""

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
from jax.sharding import NamedSharding, PartitionSpec
import jax.numpy as jnp
import numpy as np
import optax

from reinit import evaluation
from reinit import methods
from reinit import models
from reinit import transforms
from reinit.steps import make_optimizer
from reinit.steps import optimizer_fields
from reinit.steps import OptimizerFields
from reinit.steps import make_train_step
from reinit.steps import TrainState
from reinit.validation import num_devices

PyTree = Any


def rarely_run_jit(fun, **kwargs):
  """`jax.jit` for functions run a few times per run (init, stage switches): on CPU, XLA's
  backend optimizations cost seconds of compile time (5 s for an init) and save nothing."""
  if jax.default_backend() == "cpu":
    kwargs["compiler_options"] = {"xla_backend_optimization_level": 0}
  return jax.jit(fun, **kwargs)


def data_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The run's 1-D `data` mesh, each process's devices side by side in process order, over
  the first `num_devices` of `devices` (default: all of every process).

  Process p then holds rows [p * B/P, (p + 1) * B/P) of every global batch of B, P processes:
  the rows its input pipeline feeds (`reinit.data.Data.train`).
  """
  devices = jax.devices() if devices is None else list(devices)
  mesh = jax.make_mesh((num_devices(config),), ("data",), devices=devices[:num_devices(config)])
  # Stable: within a process, make_mesh's (topology-aware) order stays.
  devices = sorted(mesh.devices.flat, key=lambda d: d.process_index)
  return jax.sharding.Mesh(np.array(devices), ("data",))


@dataclasses.dataclass(frozen=True)
class Runtime:
  """The model, optimizer, shardings and jitted functions of a run, shared by all its stages.

  Built once by `build_runtime`; `compile_steps` compiles its steps ahead of time.
  """
  model: Any
  tx: optax.GradientTransformation  # the plan's optimizer
  replicated: NamedSharding
  batch_sharding: NamedSharding
  init: Any  # key -> variables, replicated
  opt_init: Any  # params -> optimizer state, replicated
  train_step: Any  # jitted `make_train_step`, state donated
  eval_step: Any  # jitted `make_eval_step`
  begin: Any  # the plan's begin, jitted
  switch: Any  # the plan's switch, jitted once for all stages (k is traced)
  calibrate: Any  # the plan's calibration, jitted with the unit static; None without one
  reset_opt_state: Any


def build_runtime(config, num_classes: int, image_shape, plan: methods.Plan,
                  runs: int = 1, devices=None) -> Runtime:
  """Mesh, shardings, model, optimizer and the jitted functions of a run of `plan` (of each
  of `runs` runs of a group: the model's `conv='auto'` resolves by it) on `devices` (default
  all: `data_mesh`)."""
  mesh = data_mesh(config, devices)
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  model = models.from_config(config, num_classes, runs)
  tx = plan.optimizer(make_optimizer(config))
  train_step = jax.jit(
      make_train_step(model, tx, num_classes=num_classes,
                      label_smoothing=config.label_smoothing),
      in_shardings=(replicated, batch_sharding, replicated),
      out_shardings=(replicated, replicated), donate_argnums=0)
  eval_step = jax.jit(evaluation.make_eval_step(model, num_classes=num_classes),
                      in_shardings=(replicated, batch_sharding), out_shardings=replicated)
  # Fully optimized, unlike the other stage-switch functions: it runs forward passes of the
  # model on training batches, up to the calibrated unit (one compile per unit).
  calibrate = None if plan.calibration is None else jax.jit(
      lambda variables, images, unit: plan.calibration.apply(model.apply, variables, images,
                                                             unit), static_argnums=2)
  return Runtime(
      model=model, tx=tx, replicated=replicated, batch_sharding=batch_sharding,
      init=_jitted_init(model, tuple(image_shape), replicated),
      opt_init=_jitted_opt_init(optimizer_fields(config), plan.optimizer, replicated),
      train_step=train_step,
      eval_step=eval_step, begin=rarely_run_jit(plan.begin),
      switch=rarely_run_jit(plan.switch), calibrate=calibrate,
      reset_opt_state=rarely_run_jit(transforms.reset_opt_state))


# Jitted once per process for what they close over (a linen module is hashable by its fields,
# the optimizer by its fields and the plan's wrapper): the runs of a sweep share their traces.
@functools.lru_cache(maxsize=16)
def _jitted_init(model, image_shape: tuple[int, ...], sharding: NamedSharding):
  """key -> the model's initial variables, placed by `sharding`."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  return rarely_run_jit(lambda key: model.init(key, dummy, train=False), out_shardings=sharding)


@functools.lru_cache(maxsize=16)
def _jitted_opt_init(optimizer: OptimizerFields, wrapper, sharding: NamedSharding):
  """params -> a fresh state of `wrapper(make_optimizer(optimizer))`, placed by `sharding`."""
  return rarely_run_jit(wrapper(make_optimizer(optimizer)).init, out_shardings=sharding)


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
  """The ahead-of-time compiled steps: a stage that changed a shape or a sharding would fail
  loudly instead of recompiling silently."""
  train_step: Any
  eval_step: Any
  compile_s: float
  train_step_flops: float  # the whole (global) step, from XLA's cost analysis; NaN if unknown


def compile_steps(runtime: Runtime, state: TrainState, train_batch, eval_batch) -> CompiledSteps:
  """Compiles the train and eval steps for these shapes (arrays or ShapeDtypeStructs)."""
  start = time.perf_counter()
  lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=runtime.replicated)
  train_step = runtime.train_step.lower(state, train_batch, lr).compile()
  eval_step = runtime.eval_step.lower(state.variables, eval_batch).compile()
  # XLA's cost analysis counts one device's share of the data-parallel step.
  devices = runtime.replicated.mesh.size
  return CompiledSteps(train_step, eval_step, time.perf_counter() - start,
                       flops(train_step) * devices)


def flops(compiled) -> float:
  """FLOPs of one call of a compiled function, from XLA's cost analysis (NaN if unknown)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


# ---------------------------------------------------------------- batches and stage starts


def global_batch(batch, sharding: NamedSharding):
  """Host-local numpy batch -> global jax arrays sharded on the `data` axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def abstract_batch(dataset, sharding: NamedSharding, process_count: int):
  """Global shapes of a host-local batch of a tf.data `dataset`, for ahead-of-time compiling."""
  def spec(x):
    return jax.ShapeDtypeStruct((x.shape[0] * process_count, *x.shape[1:]),
                                x.dtype.as_numpy_dtype, sharding=sharding)
  return jax.tree.map(spec, dataset.element_spec)


def calibration_images(iterator, count: int, sharding: NamedSharding) -> jax.Array:
  """The next `count` global training batches' images, (count, B, H, W, C), batch on `data`.

  Each process contributes its rows, as to a train step: the statistics computed from them are
  those of the global batches, the same in every process and for any process count.
  """
  local = np.stack([next(iterator)["image"] for _ in range(count)])
  return jax.make_array_from_process_local_data(
      NamedSharding(sharding.mesh, PartitionSpec(None, "data")), local)


class RunKeys(NamedTuple):
  """Keys of a run: initialization, the fresh draws of stage switches, the method's own."""
  init: jax.Array
  fresh: jax.Array
  method: jax.Array


def run_keys(seed: int) -> RunKeys:
  return RunKeys(*jax.random.split(jax.random.key(seed), 3))


def initial_state(runtime: Runtime, keys: RunKeys) -> TrainState:
  """Stage 0's state: the initial variables, a fresh optimizer state, the method's memory."""
  variables = runtime.init(keys.init)
  return jax.device_put(TrainState(jnp.zeros((), jnp.int32), variables,
                                   runtime.opt_init(variables["params"]),
                                   runtime.begin(variables, keys.method)),
                        runtime.replicated)


def switch_stage(runtime: Runtime, k: int, state: TrainState, keys: RunKeys, *,
                 reset_optimizer: str, calibration: tuple[str, jax.Array] | None = None
                 ) -> TrainState:
  """The state at the start of stage k >= 1: the plan's switch, its calibration of
  `(unit, images)` if any, then the optimizer policy (`fresh` or `masked`)."""
  fresh = runtime.init(jax.random.fold_in(keys.fresh, k))
  switched = runtime.switch(jnp.int32(k), state.variables, fresh, state.memory,
                            jax.random.fold_in(keys.method, k))
  variables = switched.variables
  if calibration is not None:
    unit, images = calibration
    variables = runtime.calibrate(variables, images, unit)
  if reset_optimizer == "fresh":
    opt_state = runtime.opt_init(variables["params"])
  else:
    opt_state = runtime.reset_opt_state(state.opt_state, switched.touched)
  return jax.device_put(TrainState(state.step, variables, opt_state, switched.memory),
                        runtime.replicated)
