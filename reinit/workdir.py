"""A run's directory: file names, I/O through `etils.epath` (local folders and gs:// alike),
claiming it for a config, orbax checkpoints and saved variables, and `load_run`.

  WORKDIR/config.json       the run's config, written first (`claim`)
  WORKDIR/checkpoints/N     orbax: the train state and the loop's progress at step N
  WORKDIR/variables/init    orbax: the variables at initialization, and at the end (`final`)
  WORKDIR/results.json      written last, by process 0: a finished run
  WORKDIR/analysis.json     `launch.analyze`'s numbers of a finished run
"""

import copy
import dataclasses
import json
import os
import time
from typing import Any, Sequence

from absl import logging
from etils import epath
import flax
import jax
import jax.numpy as jnp

from reinit import models
from reinit.validation import ConfigError

PyTree = Any
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
ANALYSIS_FILE = "analysis.json"
CHECKPOINT_DIR = "checkpoints"
VARIABLES_DIR = "variables"
# Fields that change how a run is logged or checkpointed, not what it computes.
BOOKKEEPING_FIELDS = ("log_every_steps", "checkpoint_every_steps", "data_dir")
# Config fields added after runs were recorded, each with the value that does what a recorded
# config without it did: such a run still resumes, and pools in a report, as before.
ADDED_FIELDS = {"sp.reset_batch_stats": False}

# What may lie in a workdir before reinit claims it (writes its config.json, the first thing
# it writes there): hidden files (.DS_Store, .nfs*) and the logs a scheduler or a shell
# redirection puts next to a run (slurm-%j.out).
_HIDDEN = "."
_LOG_SUFFIXES = (".log", ".out", ".err")


def path(workdir: str, *parts: str) -> epath.Path:
  """`workdir/parts...` as an `etils.epath.Path`."""
  return epath.Path(workdir).joinpath(*parts)


def absolute(workdir: str) -> str:
  """Orbax wants absolute paths; URLs (gs://...) already are."""
  return workdir if "://" in workdir else os.path.abspath(workdir)


def write_json_atomically(target: epath.Path, payload: dict) -> None:
  """Writes JSON to `target` through a temporary file: never half-written."""
  tmp = target.parent / (target.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
  tmp.rename(target)


def read_json(source: epath.Path) -> dict:
  return json.loads(source.read_text())


def flat_config(config: dict) -> dict[str, Any]:
  """`{"lw.rescale": True, ...}`: a nested config dict with `.`-joined keys."""
  return flax.traverse_util.flatten_dict(config, sep=".")


def combination_key(config) -> str:
  """A config's every field but `seed`, as one string: equal for the runs that differ only in
  their seed (a group's runs: they share its programs)."""
  return json.dumps({k: v for k, v in flat_config(config.to_dict()).items() if k != "seed"},
                    sort_keys=True, default=str)


def foreign_entries(workdir: str) -> list[str]:
  """Sorted names in `workdir` other than hidden files and logs: files reinit did not write
  when the folder has no config.json (every run writes its config.json first). [] when the
  folder does not exist."""
  folder = path(workdir)
  if not folder.exists():
    return []
  return sorted(entry.name for entry in folder.iterdir()
                if not entry.name.startswith(_HIDDEN)
                and not (entry.name.endswith(_LOG_SUFFIXES) and entry.is_file())
                # Another process of this run writing the config (write_json_atomically).
                and entry.name != CONFIG_FILE + ".tmp")


def with_added_fields(flat: dict) -> dict:
  """A `flat_config` with the `ADDED_FIELDS` it lacks, at their old-behaviour values."""
  return {**ADDED_FIELDS, **flat}


def claim(config, workdir: str) -> None:
  """Records the config in `workdir`, or checks it equals the one recorded there.

  Raises:
    ConfigError: the workdir holds a run with a different config (names the differing fields),
      or files reinit did not write and no config.json (`foreign_entries`: e.g. results.json
      copied from elsewhere); nothing in it is touched.
  """
  config_path = path(workdir, CONFIG_FILE)
  current = json.loads(json.dumps(config.to_dict()))
  if config_path.exists():
    a, b = (with_added_fields(flat_config(c)) for c in (read_json(config_path), current))
    differing = sorted(k for k in set(a) | set(b)
                       if a.get(k) != b.get(k) and k not in BOOKKEEPING_FIELDS)
    if differing:
      raise ConfigError(f"workdir={workdir!r} holds a run with a different config (fields: "
                        f"{', '.join(differing)}); accepted: the same config to resume it, or "
                        "another workdir")
    return
  foreign = foreign_entries(workdir)
  if foreign and config_path.exists():  # another process of this run claimed it meanwhile
    return claim(config, workdir)
  if foreign:
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if foreign[3:] else "")
    raise ConfigError(f"workdir={workdir!r} holds files reinit did not write ({shown}) and no "
                      f"{CONFIG_FILE}; accepted: a new or empty folder, or the workdir of a run "
                      "with this config")
  config_path.parent.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    write_json_atomically(config_path, current)


# ---------------------------------------------------------------- orbax


def checkpoint_manager(workdir: str, min_interval_s: int | None = None):
  """The orbax manager of `workdir`'s checkpoints (the newest 3 kept). With `min_interval_s`,
  saves that are not forced (`save_checkpoint(..., force=False)`) happen only when that many
  seconds passed since the last one and none is in flight (orbax's continuous policy)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint.checkpoint_managers import save_decision_policy  # pylint: disable=g-import-not-at-top
  policy = None if min_interval_s is None else save_decision_policy.ContinuousCheckpointingPolicy(
      minimum_interval_secs=int(min_interval_s))
  return ocp.CheckpointManager(
      os.path.join(absolute(workdir), CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True,
                                           save_decision_policy=policy))


def save_checkpoint(manager, state: PyTree, progress: dict, force: bool = True) -> bool:
  """Saves `state` and the loop's `progress` (a JSON dict) at step `progress['global_step']`;
  unless `force`, only if the manager's save policy says so. Returns whether it saved."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # A copy: the save finishes in the background while the loop goes on updating `progress`.
  return bool(manager.save(int(progress["global_step"]), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(copy.deepcopy(progress))),
      force=force))


def abstract(tree: PyTree) -> PyTree:
  """Shapes, dtypes and shardings of a tree of arrays: what orbax restores into."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _move_aside(manager, step: int) -> epath.Path:
  """Moves the checkpoint of `step` to corrupt_checkpoints/ (kept for whoever investigates)."""
  directory = epath.Path(str(manager.directory))
  aside = directory.parent / "corrupt_checkpoints"
  if jax.process_index() == 0:
    aside.mkdir(parents=True, exist_ok=True)
    (directory / str(step)).rename(aside / f"{step}-{int(time.time())}")
  manager.reload()
  return aside


def restore_latest(manager, abstract_state: PyTree) -> tuple[PyTree, dict] | None:
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
      # Moved aside, not deleted: training will write this step again.
      aside = _move_aside(manager, step)
      logging.warning("checkpoint at step %d is unreadable (%s); moved to %s, trying the "
                      "previous one", step,
                      str(e).splitlines()[0] if str(e) else type(e).__name__, aside)
  return None


def save_variables(workdir: str, name: str, variables: PyTree) -> None:
  """Writes `variables` to WORKDIR/variables/NAME; every process takes part (orbax syncs)."""
  save_variables_of_runs([workdir], name, [variables])


def save_variables_of_runs(workdirs: Sequence[str], name: str,
                           variables: Sequence[PyTree]) -> None:
  """`save_variables` of several runs (a group's), their writes in flight together; returns
  when all are written. Every process takes part (orbax syncs)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if len(workdirs) != len(variables):
    raise ValueError(f"{len(workdirs)} workdirs but {len(variables)} variable trees")
  if jax.process_count() == 1:
    # Host copies: orbax writes numpy arrays in about half the time of device arrays (~50 vs
    # ~110 ms for a digits SimpleCNN; a sweep writes two per run). `load_run` reads either.
    variables = jax.device_get(list(variables))
  # One checkpointer per run (each has at most one save in flight). On several processes one
  # save at a time: orbax names its cross-process barriers after the directory, `name` for
  # every run, so concurrent saves would share them.
  together = jax.process_count() == 1
  checkpointers = []
  try:
    for workdir, tree in zip(workdirs, variables):
      checkpointers.append(ocp.StandardCheckpointer())
      checkpointers[-1].save(os.path.join(absolute(workdir), VARIABLES_DIR, name), tree,
                             force=True)
      if not together:
        checkpointers[-1].wait_until_finished()
  finally:  # every save started completes, also when one fails; the first error is raised
    errors = []
    for checkpointer in checkpointers:
      try:
        checkpointer.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)
      finally:
        checkpointer.close()
    if errors:
      raise errors[0]


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
  results_path = path(workdir, RESULTS_FILE)
  if not results_path.exists():
    raise ConfigError(f"workdir={workdir!r} holds no finished run ({RESULTS_FILE} is missing)")
  results = read_json(results_path)
  config = ml_collections.ConfigDict(results["config"])
  model = models.from_config(config, results["num_classes"])
  root = os.path.join(absolute(workdir), VARIABLES_DIR)
  # Onto the saved shardings where this process has those devices; else (a multi-host run read
  # on one machine) onto one local device.
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  args = ocp.args.StandardRestore(
      fallback_sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  def restore(name):
    # Device arrays whether they were written as numpy (one process) or device arrays.
    return jax.tree.map(jnp.asarray, checkpointer.restore(os.path.join(root, name), args=args))
  return FinishedRun(config, results, model, restore("init"), restore("final"))
