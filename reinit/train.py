"""The trainer: `train_and_evaluate(config, workdir)` runs a method's plan of stages.

Each stage starts with the plan's switch (a pure function of the variables, a fresh init, the
method's memory and a key) and, if the plan has one, its calibration; then all layers train
for the stage's epochs with a fresh (or partly reset) optimizer state and a restarted (or
continued) warmup-cosine schedule; then the stage is evaluated and checkpointed. The train and
eval steps are compiled once, ahead of time, and reused by every stage: a stage changes values,
never shapes, so it cannot recompile them. The trainer knows no method by name: everything a
method does is in its `reinit.methods.Plan`.

Data parallelism is `jax.jit` over a 1-D mesh: the batch is sharded on the `data` axis, the
train state is replicated and donated to the step. The same code runs on one CPU, many devices
or many hosts (after `jax.distributed.initialize()`, each process feeds its slice of the batch).

A run is a pure function of its config and seed on a given device count. It checkpoints with
orbax (every `checkpoint_every_steps` and at every stage end; `reinit.workdir`) and resumes from
the latest good checkpoint when started again with the same config and workdir, ending with the
same results.
"""

import dataclasses
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from reinit import evaluation
from reinit import methods
from reinit import models
from reinit import preemption
from reinit import provenance
from reinit import tree as tree_lib
from reinit import validation
from reinit import workdir as workdir_lib
# The trainer's public API, wherever its parts live.
# pylint: disable=unused-import
from reinit.runtime import abstract_batch
from reinit.runtime import build_runtime
from reinit.runtime import calibration_images
from reinit.runtime import compile_steps
from reinit.runtime import CompiledSteps
from reinit.runtime import data_mesh
from reinit.runtime import flops
from reinit.runtime import global_batch
from reinit.runtime import initial_state
from reinit.runtime import rarely_run_jit
from reinit.runtime import run_keys
from reinit.runtime import RunKeys
from reinit.runtime import Runtime
from reinit.runtime import switch_stage
from reinit.steps import cross_entropy
from reinit.steps import make_optimizer
from reinit.steps import make_train_step
from reinit.steps import stage_learning_rates
from reinit.steps import TrainState
from reinit.steps import warmup_cosine
from reinit.validation import ConfigError
from reinit.validation import num_devices
# pylint: enable=unused-import

PyTree = Any
# The workdir's file names, where callers have always found them.
RESULTS_FILE = workdir_lib.RESULTS_FILE
CONFIG_FILE = workdir_lib.CONFIG_FILE
CHECKPOINT_DIR = workdir_lib.CHECKPOINT_DIR
create_model = models.from_config
make_eval_step = evaluation.make_eval_step


class TrainingDiverged(FloatingPointError):
  """The training loss became non-finite; the message names the stage and step."""


class Preempted(Exception):
  """SIGTERM or SIGUSR1 arrived: a checkpoint of `step` is written; run again to resume."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class Progress:
  """Where the loop is, checkpointed (as JSON) with the state; `stage_results` grows per stage."""
  stage: int = 0
  step_in_stage: int = 0
  global_step: int = 0
  calibrations: int = 0
  stage_results: list = dataclasses.field(default_factory=list)
  resumed_from: list = dataclasses.field(default_factory=list)
  train_s: float = 0.0
  eval_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the stages of one run share."""
  config: Any
  workdir: str
  plan: methods.Plan
  runtime: Runtime
  steps: CompiledSteps
  keys: RunKeys
  learning_rates: list[np.ndarray]
  writer: Any  # clu metric writer
  report: Any  # clu periodic_actions.ReportProgress
  manager: Any  # orbax CheckpointManager
  notice: preemption.Notice


def _load_data(config, process_index: int | None = None, process_count: int | None = None):
  """This process's `reinit.data.Data` (of process `process_index` of `process_count`; default
  jax's); data problems become one-line ConfigErrors."""
  from reinit import data as data_lib  # pylint: disable=g-import-not-at-top
  try:
    return data_lib.Data(
        config,
        process_index=jax.process_index() if process_index is None else process_index,
        process_count=jax.process_count() if process_count is None else process_count)
  except ValueError as e:
    raise ConfigError(str(e).splitlines()[0]) from e


def _save(run: _Run, state: TrainState, progress: Progress) -> None:
  workdir_lib.save_checkpoint(run.manager, state, dataclasses.asdict(progress))


def _stop_preempted(run: _Run, step: int):
  """Waits for the checkpoint of `step` to be written, then raises `Preempted`."""
  run.manager.wait_until_finished()
  logging.warning("preempted: checkpoint of step %d written; stopping", step)
  raise Preempted(f"preempted at step {step}: its checkpoint is in "
                  f"{run.workdir}/{CHECKPOINT_DIR}; run the same command again to resume", step)


def _log_window(run: _Run, window: list[dict], *, k: int, i: int, step: int,
                write: bool) -> None:
  """Checks the mean loss of a window of steps is finite; writes the means when `write`."""
  from clu import metrics as clu_metrics  # pylint: disable=g-import-not-at-top
  means = {name: float(clu_metrics.Average.from_model_output(
      np.asarray([m[name] for m in jax.device_get(window)])).compute()) for name in window[0]}
  if not np.isfinite(means["loss"]):
    raise TrainingDiverged(f"non-finite training loss at stage {k}, step {i + 1} of the stage "
                           f"(global step {step}); the last good checkpoint stays in "
                           f"{run.workdir}/{CHECKPOINT_DIR}")
  if write:
    run.writer.write_scalars(step, {f"train/{n}": v for n, v in means.items()}
                             | {"train/learning_rate": float(run.learning_rates[k][i]),
                                "stage": k})


def train_stage(run: _Run, k: int, state: TrainState, progress: Progress,
                train_iter) -> tuple[TrainState, bool]:
  """Trains stage k from `progress.step_in_stage` to its end; checkpoints every
  `checkpoint_every_steps`; on a preemption notice checkpoints and stops (`Preempted`), or,
  at the stage's last step, returns True for the stage end to stop after its checkpoint."""
  lrs, every = run.learning_rates[k], run.config.checkpoint_every_steps
  window, start = [], time.perf_counter()
  try:
    for i in range(progress.step_in_stage, len(lrs)):
      batch = global_batch(next(train_iter), run.runtime.batch_sharding)
      state, metrics = run.steps.train_step(state, batch, lrs[i])
      # Device scalars, fetched only when logging: no host sync or eager op per step.
      window.append(metrics)
      step, last = progress.global_step + 1, i + 1 == len(lrs)
      run.report(step)
      at_log = (i + 1) % run.config.log_every_steps == 0 or last
      at_checkpoint = every > 0 and step % every == 0 and not last
      if at_log or at_checkpoint:
        _log_window(run, window, k=k, i=i, step=step, write=at_log)
        window = [] if at_log else window
      progress.step_in_stage, progress.global_step = i + 1, step
      if at_checkpoint:
        _save(run, state, progress)
      if run.notice.reached(step):
        if last:  # the stage end checkpoints this step
          return state, True
        if not at_checkpoint:
          _save(run, state, progress)
        _stop_preempted(run, step)
    return state, False
  finally:
    progress.train_s += time.perf_counter() - start


def evaluate_stage(run: _Run, k: int, state: TrainState, progress: Progress,
                   eval_sets: dict[str, evaluation.EvalSet]) -> None:
  """Evaluates the end of stage k on the test split and the training subset; records it."""
  start = time.perf_counter()
  with run.report.timed("eval"):
    test, train = (evaluation.evaluate(run.steps.eval_step, state.variables, eval_sets[name])
                   for name in ("test", "train"))
  progress.eval_s += time.perf_counter() - start
  run.writer.write_scalars(progress.global_step, eval_scalars(test, train))
  progress.stage_results.append(stage_record(run.plan, run.learning_rates, k, test, train))
  logging.info("stage %d/%d: train accuracy %.4f, test accuracy %.4f", k + 1,
               run.plan.num_stages, train["accuracy"], test["accuracy"])


def eval_scalars(test: dict, train: dict) -> dict[str, float]:
  """The summaries of a stage end's evaluation (`evaluation.evaluate` dicts)."""
  return {"test/accuracy": test["accuracy"], "test/loss": test["loss"],
          "train_eval/accuracy": train["accuracy"], "train_eval/loss": train["loss"]}


def stage_record(plan: methods.Plan, learning_rates, k: int, test: dict, train: dict) -> dict:
  """Stage k's entry of `results.json`'s `stages`, from its test and train evaluations."""
  return {
      "stage": k, "epochs": plan.epochs[k], "steps": len(learning_rates[k]),
      "learning_rate": plan.learning_rates[k],
      "train_accuracy": train["accuracy"], "train_loss": train["loss"],
      "test_accuracy": test["accuracy"], "test_loss": test["loss"],
      "test_examples": test["examples"],
      # Under label noise: the fraction of corrupted training examples fitted to their wrong
      # label, and the accuracy on the clean ones.
      **{f"train_{name}": train[name] for name in ("memorized", "clean_accuracy")
         if name in train}}


def _start_stage(run: _Run, k: int, state: TrainState, progress: Progress,
                 calibration_iter) -> TrainState:
  """Stage k's switch (and calibration), counted in `progress` for exact resumes."""
  unit = run.plan.calibrated_unit(k)
  calibration = None
  if unit is not None:
    calibration = (unit, calibration_images(calibration_iter, run.plan.calibration.batches,
                                            run.runtime.batch_sharding))
    progress.calibrations += 1
  return switch_stage(run.runtime, k, state, run.keys,
                      reset_optimizer=run.config.reset_optimizer, calibration=calibration)


def _plan(config, units: list[str]) -> methods.Plan:
  try:
    return methods.make_plan(config, units)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def _restore_or_begin(run: _Run, state: TrainState) -> tuple[TrainState, Progress]:
  """The newest good checkpoint's state and progress, or (having recorded the hparams and the
  initial variables) `state` and a fresh progress."""
  restored = workdir_lib.restore_latest(run.manager, workdir_lib.abstract(state))
  if restored is None:
    run.writer.write_hparams({k: v for k, v in workdir_lib.flat_config(
        run.config.to_dict()).items() if isinstance(v, (int, float, str, bool))})
    workdir_lib.save_variables(run.workdir, "init", state.variables)
    return state, Progress()
  state, progress = restored
  progress = Progress(**progress)
  progress.resumed_from = progress.resumed_from + [progress.global_step]
  logging.info("resumed from step %d (stage %d)", progress.global_step, progress.stage)
  return jax.device_put(state, run.runtime.replicated), progress


def _results(run: _Run, info, units: list[str], progress: Progress, wall_s: float) -> dict:
  """The contents of results.json (see the README's "Results format")."""
  config, stages = run.config, progress.stage_results
  total_steps = sum(len(lrs) for lrs in run.learning_rates)
  epochs = int(sum(run.plan.epochs))
  return {
      "dataset": config.dataset, "model": config.model, "method": config.method,
      "seed": config.seed, "train_examples": info.train_examples,
      "test_examples": stages[-1]["test_examples"], "num_classes": info.num_classes,
      "units": units, "stages": stages, "test_accuracy": stages[-1]["test_accuracy"],
      "train_accuracy": stages[-1]["train_accuracy"], "total_epochs": epochs,
      "devices": num_devices(config),
      "compute": {
          "total_epochs": epochs, "train_steps": total_steps,
          "examples_seen": total_steps * config.batch_size,
          "train_step_flops": run.steps.train_step_flops,
          "train_flops": run.steps.train_step_flops * total_steps,
      },
      "time_s": {"compile": run.steps.compile_s, "train": progress.train_s,
                 "eval": progress.eval_s},
      "resumed_from": progress.resumed_from, "wall_time_s": wall_s,
      "config": config.to_dict(),
      # Versions, code commit, devices and XLA flags: what produced these numbers.
      "provenance": provenance.collect(),
  }


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
    Preempted: SIGTERM or SIGUSR1 arrived; a checkpoint is written.
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  validation.validate(config)
  data = _load_data(config)
  info, train_ds, test_ds = data.info, data.train(), data.eval(config.test_split)
  keys = run_keys(config.seed)
  units = tree_lib.layer_order(create_model(config, info.num_classes), keys.init,
                               jnp.zeros((1, *info.image_shape), jnp.float32), train=False)
  plan = _plan(config, units)
  workdir_lib.claim(config, workdir)
  results_path = workdir_lib.path(workdir, RESULTS_FILE)
  if results_path.exists():
    logging.info("%s is finished; returning its results", workdir)
    return workdir_lib.read_json(results_path)
  logging.info("%s on %s with %s: %d stages, units %s, %d train examples, %d steps/epoch",
               plan.name, config.dataset, config.model, plan.num_stages, units,
               info.train_examples, data.steps_per_epoch)

  runtime = build_runtime(config, info.num_classes, info.image_shape, plan)
  state = initial_state(runtime, keys)  # its shapes are every stage's: it serves to compile
  processes = jax.process_count()
  learning_rates = stage_learning_rates(config, plan, data.steps_per_epoch)
  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=jax.process_index() != 0)
  run = _Run(config, workdir, plan, runtime,
             compile_steps(runtime, state,
                           abstract_batch(train_ds, runtime.batch_sharding, processes),
                           abstract_batch(test_ds, runtime.batch_sharding, processes)),
             keys, learning_rates, writer,
             periodic_actions.ReportProgress(
                 num_train_steps=sum(len(lrs) for lrs in learning_rates), writer=writer,
                 every_steps=config.log_every_steps),
             workdir_lib.checkpoint_manager(workdir),
             # SIGTERM/SIGUSR1 from here on: checkpoint the current step and stop.
             preemption.Notice())
  try:
    state, progress = _restore_or_begin(run, state)
    to_global = lambda batch: global_batch(batch, runtime.batch_sharding)
    # Two independent datasets over the same stream: training, and the plan's calibration.
    state = _run_stages(run, state, progress, train_ds, data.train(), {
        "test": evaluation.EvalSet(test_ds, to_global),
        "train": evaluation.EvalSet(data.train_eval(), to_global)})
  finally:
    # Also on errors and interrupts: an in-flight asynchronous save is completed, not left
    # half-written.
    run.manager.wait_until_finished()
    run.notice.restore()
  writer.flush()
  return _finish(run, info, units, progress, state, start)


def _run_stages(run: _Run, state: TrainState, progress: Progress, train_ds, calibration_ds,
                eval_sets) -> TrainState:
  """Stages `progress.stage`.. to the end: switch, train, evaluate, checkpoint."""
  # The data streams are pure functions of the config: skipping what was consumed restores them.
  train_iter = train_ds.skip(progress.global_step).as_numpy_iterator()
  batches = run.plan.calibration.batches if run.plan.calibration else 0
  calibration_iter = calibration_ds.skip(progress.calibrations * batches).as_numpy_iterator()
  for k in range(progress.stage, run.plan.num_stages):
    if progress.step_in_stage == 0 and k > 0:
      state = _start_stage(run, k, state, progress, calibration_iter)
    state, preempted_at_end = train_stage(run, k, state, progress, train_iter)
    evaluate_stage(run, k, state, progress, eval_sets)
    progress.stage, progress.step_in_stage = k + 1, 0
    _save(run, state, progress)
    # A notice during the evaluation stops here, at the checkpoint just written; a run whose
    # last stage is done finishes instead.
    if k + 1 < run.plan.num_stages and (preempted_at_end or (
        run.notice.signal is not None and not run.notice.multiprocess)):
      _stop_preempted(run, progress.global_step)
  return state


def _finish(run: _Run, info, units: list[str], progress: Progress, state: TrainState,
            start: float) -> dict:
  """Saves the final variables and writes results.json (process 0); returns the results."""
  results = _results(run, info, units, progress, time.perf_counter() - start)
  workdir_lib.save_variables(run.workdir, "final", state.variables)
  if jax.process_index() == 0:
    workdir_lib.write_json_atomically(workdir_lib.path(run.workdir, RESULTS_FILE), results)
  return results
