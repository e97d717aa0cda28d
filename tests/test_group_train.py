"""The grouped trainer (reinit.group_train): run i of a group is the run of its seed in a group
of one, from bit-identical initial variables to (rtol 1e-5) final ones; a resumed group equals
an unbroken one; every run writes the single run's results.json.

Tiny LW on digits (simple_cnn width 0.125, 2 stages, a few steps), on CPU.
"""

import concurrent.futures
import json
import math
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits as digits_config
from reinit import group_train
from reinit import train
from reinit import workdir as workdir_lib

SEEDS = (0, 1, 2)


def _config(data_dir, **overrides):
  config = digits_config.get_config("method=lw")
  config.data_dir = data_dir
  config.width = 0.125
  config.train_examples = 40
  config.batch_size = 16
  config.eval_batch_size = 100
  config.epochs_per_stage = 1
  config.num_stages = 2
  config.log_every_steps = 2
  config.num_devices = 1
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _group(config, root, name, seeds, checkpoint_interval_s=0, data_on="auto"):
  """A group trained in root/name/seed{s}; checkpoints at every stage end unless told."""
  workdirs = [os.path.join(root, name, f"seed{s}") for s in seeds]
  return workdirs, group_train.train_group(config, seeds, workdirs,
                                           checkpoint_interval_s=checkpoint_interval_s,
                                           data_on=data_on)


@pytest.fixture(scope="module")
def groups_run(data_dir, tmp_path_factory):
  """The group of SEEDS and, for the middle seed, a group of one."""
  root = str(tmp_path_factory.mktemp("groups"))
  config = _config(data_dir)
  return root, _group(config, root, "all", SEEDS), _group(config, root, "one", SEEDS[1:2])


def _variables(workdir, name):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir_lib.absolute(workdir), "variables", name))


def test_run_of_group_equals_group_of_one(groups_run):
  _, (all_dirs, _), (one_dirs, _) = groups_run
  # The same initial variables, bit for bit, and the same as the seed's single run starts from.
  init_all, init_one = _variables(all_dirs[1], "init"), _variables(one_dirs[0], "init")
  jax.tree.map(np.testing.assert_array_equal, init_all, init_one)
  other = _variables(all_dirs[0], "init")
  # Another seed starts elsewhere (kernels differ; biases are zeros in every run).
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, other, init_all)))
  final_all, final_one = _variables(all_dirs[1], "final"), _variables(one_dirs[0], "final")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               final_all, final_one)
  # It trained: the final params are not the initial ones.
  assert not all(jax.tree.leaves(jax.tree.map(np.allclose, final_one["params"],
                                              init_one["params"])))


@pytest.fixture(scope="module")
def alone(data_dir, tmp_path_factory):
  """(workdir, results) of the single run of SEEDS[1] (`train.train_and_evaluate`)."""
  workdir = str(tmp_path_factory.mktemp("single"))
  return workdir, train.train_and_evaluate(_config(data_dir, seed=SEEDS[1]), workdir)


def test_results_have_single_run_format(groups_run, alone):
  _, (all_dirs, results), (_, one_results) = groups_run
  _, single = alone
  for workdir, result, seed in zip(all_dirs, results, SEEDS):
    with open(os.path.join(workdir, "results.json")) as f:
      written = json.load(f)
    assert written == json.loads(json.dumps(result))
    assert set(written) == set(single)
    assert set(written["compute"]) == set(single["compute"])
    assert [set(s) for s in written["stages"]] == [set(s) for s in single["stages"]]
    assert written["seed"] == seed and written["test_examples"] == single["test_examples"]
    assert written["compute"]["train_steps"] == single["compute"]["train_steps"]
    assert written["compute"]["examples_seen"] == single["compute"]["examples_seen"]
    # A run's compute is the single run's, not what the group's batched program counts.
    assert written["compute"]["train_step_flops"] == single["compute"]["train_step_flops"] > 0
    assert written["compute"]["train_flops"] == single["compute"]["train_flops"]
  np.testing.assert_allclose(results[1]["test_accuracy"], one_results[0]["test_accuracy"],
                             atol=1e-6)


class Killed(Exception):
  """Stands for a kill: raised in place of a window of training."""


def _kill_after(monkeypatch, windows: int):
  """Makes the group stop (as if killed) when it starts window number `windows + 1`."""
  real, calls = group_train._train_window, [0]  # pylint: disable=protected-access

  def counting(*args):
    calls[0] += 1
    if calls[0] > windows:
      raise Killed()
    return real(*args)
  monkeypatch.setattr(group_train, "_train_window", counting)


@pytest.fixture(scope="module")
def unbroken(data_dir, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("unbroken"))
  # 3 steps per epoch, 6 per stage; windows of 2 steps cut at the checkpoint steps 3, 6, 9, 12:
  # 4 windows a stage, steps 0-2, 2-3, 3-4, 4-6 of it.
  config = _config(data_dir, epochs_per_stage=2, checkpoint_every_steps=3)
  return config, _group(config, root, "g", SEEDS[:2])


def _comparable(result):
  return {k: v for k, v in result.items()
          if k not in ("time_s", "wall_time_s", "resumed_from", "provenance")}


# Killed in stage 0 one window after the checkpoint of step 3; right after the stage-0 end
# (step 6: the switch and calibration run again); in stage 1 one window after that of step 9.
@pytest.mark.parametrize("windows,resumed_at", [(3, 3), (4, 6), (7, 9)])
def test_resumed_group_equals_unbroken(unbroken, tmp_path, monkeypatch, windows, resumed_at):
  config, expected = unbroken
  _killed_then_resumed_equals(expected, config, tmp_path, monkeypatch, windows, resumed_at)


def _killed_then_resumed_equals(expected, config, tmp_path, monkeypatch, windows: int,
                                resumed_at: int, **group_args):
  """A group of SEEDS[:2] killed after `windows` windows, then started again, resumes from
  step `resumed_at` and ends as `expected` (workdirs, results) bit for bit."""
  _kill_after(monkeypatch, windows)
  with pytest.raises(Killed):
    _group(config, str(tmp_path), "g", SEEDS[:2], **group_args)
  monkeypatch.undo()
  workdirs, results = _group(config, str(tmp_path), "g", SEEDS[:2], **group_args)
  for workdir, expected_dir, unbroken_result, result in zip(workdirs, *expected, results):
    assert result["resumed_from"] == [resumed_at]
    assert _comparable(result) == _comparable(unbroken_result)
    jax.tree.map(np.testing.assert_array_equal, _variables(workdir, "final"),
                 _variables(expected_dir, "final"))


_KILLED_GROUP = """
import os, signal, sys
sys.path.insert(0, {root!r})
from reinit import group_train
from tests import test_group_train as t
real, calls = group_train._train_window, [0]
def killing(*args):
  calls[0] += 1
  if calls[0] > {windows}:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: an in-flight save is cut
  return real(*args)
group_train._train_window = killing
config = t._config({data_dir!r}, epochs_per_stage=2, checkpoint_every_steps=3)
t._group(config, {workdir!r}, "g", t.SEEDS[:2])
"""


def test_group_killed_by_sigkill_resumes_exactly(unbroken, data_dir, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  config, (unbroken_dirs, unbroken_results) = unbroken
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = _KILLED_GROUP.format(root=root, windows=6, data_dir=data_dir, workdir=str(tmp_path))
  killed = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                          text=True, check=False, env={**os.environ, "PYTHONPATH": root})
  assert killed.returncode == -9, killed.stderr[-2000:]
  workdirs, results = _group(config, str(tmp_path), "g", SEEDS[:2])
  for workdir, expected_dir, result, expected in zip(workdirs, unbroken_dirs, results,
                                                     unbroken_results):
    # Killed right after the save of step 9 was issued: orbax writes it in the background,
    # so the kill may cut it; the group then resumes from the stage end before (step 6).
    assert result["resumed_from"] in ([9], [6])
    assert _comparable(result) == _comparable(expected)
    jax.tree.map(np.testing.assert_array_equal, _variables(workdir, "final"),
                 _variables(expected_dir, "final"))


def test_a_group_on_cpu_evaluates_with_xlas_convolution_unless_told_otherwise(monkeypatch):
  # conv='auto': trains with im2col, evaluates (forward only) with XLA's convolution on CPU,
  # whose logits are im2col's up to rounding; an explicit choice, or another backend, keeps
  # the training model.
  from reinit import models  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  config = digits_config.get_config("method=lw")
  config.conv = "auto"
  trained = models.from_config(config, 10, 3)
  assert group_train._eval_model(config, 10, trained) is trained
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  config.conv = "auto"
  trained = models.from_config(config, 10, 3)
  evaluated = group_train._eval_model(config, 10, trained)
  assert (trained.conv, evaluated.conv) == ("im2col", "xla")
  images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
  variables = trained.init(jax.random.key(1), images, train=False)
  np.testing.assert_allclose(evaluated.apply(variables, images, train=False),
                             trained.apply(variables, images, train=False), rtol=1e-4, atol=1e-5)
  config.conv = "im2col"
  assert group_train._eval_model(config, 10, trained) is trained


def test_windows_end_at_logging_steps_stage_ends_and_global_checkpoint_steps():
  windows = group_train._windows  # pylint: disable=protected-access
  assert windows(7, 3) == [(0, 3), (3, 3), (6, 1)]
  assert windows(7, 3, start=4) == [(4, 2), (6, 1)]  # a resume cuts as the unbroken run
  # Stage 1 of 6-step stages (global steps 6..12), checkpoints every 3 global steps.
  assert windows(6, 2, offset=6, checkpoint_every=3) == [(0, 2), (2, 1), (3, 1), (4, 2)]
  # A stage from global step 10, checkpoints every 50 (global 50 and 100: stage steps 40, 90).
  assert windows(100, 20, offset=10, checkpoint_every=50) == [
      (0, 20), (20, 20), (40, 20), (60, 20), (80, 10), (90, 10)]


def test_union_of_subsets_keeps_each_runs_examples_in_order():
  # Run 0 trains on examples 5, 2, 7 of the split; run 1 on 2, 9, 5, where label noise gave
  # example 5 another label (3 instead of 1): the union holds (5, 1) and (5, 3) both.
  indices, labels, members = group_train.union_of_subsets([
      (np.array([5, 2, 7]), np.array([1, 0, 4])),
      (np.array([2, 9, 5]), np.array([0, 8, 3]))])
  np.testing.assert_array_equal(indices, [2, 5, 5, 7, 9])
  np.testing.assert_array_equal(labels, [0, 1, 3, 4, 8])
  np.testing.assert_array_equal(indices[members], [[5, 2, 7], [2, 9, 5]])
  np.testing.assert_array_equal(labels[members], [[1, 0, 4], [0, 8, 3]])
  with pytest.raises(ValueError, match="differ in size"):
    group_train.union_of_subsets([(np.array([1]), np.array([0])),
                                  (np.array([1, 2]), np.array([0, 0]))])


def test_sigterm_checkpoints_the_window_and_resumes_exactly(unbroken, tmp_path, monkeypatch):
  import signal  # pylint: disable=g-import-not-at-top
  config, (unbroken_dirs, unbroken_results) = unbroken
  real, calls = group_train._train_window, [0]  # pylint: disable=protected-access

  def signalling(*args):
    calls[0] += 1
    if calls[0] == 5:  # during stage 1's first window (steps 6..8)
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)
  monkeypatch.setattr(group_train, "_train_window", signalling)
  with pytest.raises(train.Preempted) as stopped:
    _group(config, str(tmp_path), "g", SEEDS[:2])
  assert stopped.value.step == 8  # that window's end, not a regular checkpoint step
  monkeypatch.undo()
  _, results = _group(config, str(tmp_path), "g", SEEDS[:2])
  for result, expected in zip(results, unbroken_results):
    assert result["resumed_from"] == [8]
    assert _comparable(result) == _comparable(expected)


def test_sigterm_in_a_stages_last_window_checkpoints_its_end_despite_the_interval(
    unbroken, tmp_path, monkeypatch):
  import signal  # pylint: disable=g-import-not-at-top
  config, (_, unbroken_results) = unbroken
  real, calls = group_train._train_window, [0]  # pylint: disable=protected-access

  def signalling(*args):
    calls[0] += 1
    if calls[0] == 4:  # stage 0's last window (steps 4..6)
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)
  monkeypatch.setattr(group_train, "_train_window", signalling)
  with pytest.raises(train.Preempted) as stopped:  # an hour's interval would skip step 6
    _group(config, str(tmp_path), "g", SEEDS[:2], checkpoint_interval_s=3600)
  assert stopped.value.step == 6
  monkeypatch.undo()
  _, results = _group(config, str(tmp_path), "g", SEEDS[:2], checkpoint_interval_s=3600)
  for result, expected in zip(results, unbroken_results):
    assert result["resumed_from"] == [6]
    assert _comparable(result) == _comparable(expected)


def test_later_stages_compile_nothing(data_dir, tmp_path, monkeypatch):
  # Three stages, LW calibrating a different unit after each switch: from the last window of
  # stage 1 to the last of stage 2 (stage 1's evaluation and checkpoint, stage 2's switch,
  # calibration of another unit, optimizer reset and training) nothing is compiled.
  config = _config(data_dir, num_stages=3)
  assert config.lw.normalize
  # Programs compiled by earlier tests of this process would hide stage 0's compiles.
  group_train.clear_programs()
  group_train._window_loop.cache_clear()  # pylint: disable=protected-access
  compiles, at_window = [0], []
  def count(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles[0] += 1
  jax.monitoring.register_event_duration_secs_listener(count)
  real = group_train._train_window  # pylint: disable=protected-access

  def recording(*args):
    at_window.append(compiles[0])
    return real(*args)
  monkeypatch.setattr(group_train, "_train_window", recording)
  try:
    _group(config, str(tmp_path), "g", SEEDS[:2])
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  windows_per_stage = len(at_window) // 3  # 3 steps a stage, windows of 2: 2 a stage
  assert windows_per_stage == 2 and len(at_window) == 6
  assert at_window[-1] == at_window[2 * windows_per_stage - 1]
  assert at_window[0] > 0  # the listener does count (stage 0 compiled the step functions)


@pytest.mark.parametrize("data_on", ["device", "host"])
def test_a_warmed_up_group_finds_its_programs_ready_and_trains_the_same(data_dir, tmp_path,
                                                                       data_on):
  # warm_up compiles, in its own thread, the programs train_group then asks for (the same
  # shapes, dtypes and shardings as the inputs it places): the group compiles none of them
  # again, and trains as it does without a warm-up, bit for bit. LW over 3 stages: a stage
  # start with calibration branches.
  config = _config(data_dir, num_stages=3)
  cold_dirs, cold = _group(config, str(tmp_path), "cold", SEEDS[:2], data_on=data_on)
  group_train.clear_programs()
  assert group_train.warm_up(config, SEEDS[:2], data_on=data_on).result() is None
  warmed = dict(group_train._PROGRAMS)  # pylint: disable=protected-access
  assert len(warmed) >= 3  # a window loop, the stage start, one run's step (its FLOPs)
  assert not (tmp_path / "warm").exists()  # a warm-up writes nothing
  compiles = []
  def count(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    warm_dirs, warm = _group(config, str(tmp_path), "warm", SEEDS[:2], data_on=data_on)
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  assert dict(group_train._PROGRAMS) == warmed  # pylint: disable=protected-access
  # Nothing compiled at all (the rest, evaluation and eager ops, by the cold group).
  assert not compiles
  assert [_comparable(r) for r in warm] == [_comparable(r) for r in cold]
  for cold_dir, warm_dir in zip(cold_dirs, warm_dirs):
    jax.tree.map(np.testing.assert_array_equal, _variables(warm_dir, "final"),
                 _variables(cold_dir, "final"))


def test_a_program_compiled_by_one_thread_is_waited_for_by_another_not_compiled_again():
  building, release, builds = threading.Event(), threading.Event(), []
  def build():
    builds.append(1)
    building.set()
    assert release.wait(10)
    return object()
  key = ("test", object())
  first = concurrent.futures.ThreadPoolExecutor(1).submit(group_train._program, key, build)  # pylint: disable=protected-access
  assert building.wait(10)
  second = concurrent.futures.ThreadPoolExecutor(1).submit(group_train._program, key, build)  # pylint: disable=protected-access
  release.set()
  assert first.result(10) is second.result(10)
  assert builds == [1]


def test_a_failed_compile_raises_to_every_caller_and_is_not_kept():
  key, calls = ("test", object()), []
  def failing():
    calls.append(1)
    raise ValueError("no such program")
  for _ in range(2):
    with pytest.raises(ValueError, match="no such program"):
      group_train._program(key, failing)  # pylint: disable=protected-access
  assert calls == [1, 1]  # tried again: a failure is not remembered
  assert group_train._program(key, lambda: "built") == "built"  # pylint: disable=protected-access


def test_a_warm_up_leaves_its_errors_to_train_group(data_dir, tmp_path):
  config = _config(data_dir, train_examples=10**6)  # more than the split has
  with pytest.raises(train.ConfigError) as expected:
    _group(config, str(tmp_path), "cold", SEEDS[:2])
  assert group_train.warm_up(config, SEEDS[:2]).result() is None  # nothing raised there
  with pytest.raises(train.ConfigError) as error:
    _group(config, str(tmp_path), "warm", SEEDS[:2])
  assert str(error.value) == str(expected.value)


def test_stage_end_checkpoints_follow_the_interval(data_dir, tmp_path):
  # Three stages of 3 steps (stage ends at steps 3, 6, 9): with an hour's interval only the
  # first stage end is saved (orbax's policy saves when there is no checkpoint yet); with 0,
  # every stage end.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = _config(data_dir, num_stages=3)
  for interval, expected in ((3600, [3]), (0, [3, 6, 9])):
    workdirs, _ = _group(config, str(tmp_path), f"i{interval}", SEEDS[:2], interval)
    manager = ocp.CheckpointManager(os.path.join(group_train.group_dir_of(workdirs, SEEDS[:2]),
                                                 workdir_lib.CHECKPOINT_DIR))
    assert manager.all_steps() == expected


# ------------------------------------------------------------------ launch.sweep --runs_per_program


def test_program_groups_join_runs_differing_only_in_seed():
  from launch import sweep  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  def config(method, seed, width=0.125):
    return ml_collections.ConfigDict({"method": method, "seed": seed, "lw": {"width": width}})
  configs = [config("lw", 0), config("baseline", 0), config("lw", 1), config("lw", 2),
             config("lw", 3, width=0.25), config("lw", 4)]
  assert sweep.program_groups(configs, 2) == [[0, 2], [3, 5], [1], [4]]
  assert sweep.program_groups(configs, 8) == [[0, 2, 3, 5], [1], [4]]
  assert sweep.program_groups(configs, 1) == [[i] for i in [0, 2, 3, 5, 1, 4]]
  assert sweep.program_groups(configs, 0) == [[0, 2, 3, 5], [1], [4]]  # 0: no cap
  with pytest.raises(ValueError, match="runs_per_program=-1 is invalid"):
    sweep.program_groups(configs, -1)


def _sweep_config(path, runs: list[dict]) -> str:
  """Writes a digits sweep config of `runs` (its `get_sweep`) to `path`; returns the path."""
  path.write_text("from configs import digits\nget_config = digits.get_config\n"
                  f"def get_sweep(arg):\n  return {runs!r}\n")
  return str(path)


def test_sweep_trains_seeds_as_one_program(data_dir, tmp_path, monkeypatch):
  from launch import sweep  # pylint: disable=g-import-not-at-top
  warmed = []
  real_warm_up = group_train.warm_up
  def recording_warm_up(config, seeds, **kwargs):
    warmed.append((config.method, list(seeds)))
    return real_warm_up(config, seeds, **kwargs)
  monkeypatch.setattr(group_train, "warm_up", recording_warm_up)
  config_path = _sweep_config(tmp_path / "tiny_sweep.py", [
      dict(method="lw", seed=0), dict(method="baseline", seed=0), dict(method="lw", seed=1)])
  overrides = {"data_dir": data_dir, "width": 0.125, "train_examples": 40, "batch_size": 16,
               "eval_batch_size": 100, "epochs_per_stage": 1, "num_stages": 2,
               "num_devices": 1}
  root = tmp_path / "runs"
  finished = sweep.run_sweep(config_path, None, overrides, str(root))  # all seeds grouped
  names = sorted(name for name, _, _ in finished)
  assert len(names) == 3
  for name in names:
    assert (root / name / "results.json").exists()
  # The two LW seeds trained as one group (its checkpoints next to the first's workdir), the
  # baseline as a group of one (a grouped sweep's numbers do not depend on group sizes).
  group_dirs = sorted(p.name for p in root.iterdir() if p.name.endswith(".group"))
  assert group_dirs == ["method=baseline,seed=0.seeds=0.group",
                        "method=lw,seed=0.seeds=0-1.group"]
  assert not (root / "method=baseline,seed=0" / "checkpoints").exists()
  # While the first group trained, the second's programs were compiled (the last has no next).
  assert warmed == [("baseline", [0])]
  # Started again, every run is finished: nothing trains, nothing is warmed up.
  again = sweep.run_sweep(config_path, None, overrides, str(root))
  assert sorted(name for name, _, _ in again) == names
  assert warmed == [("baseline", [0])]
  # Two tasks share the groups (in order of first appearance), not the runs.
  shares = [sorted(name for name, _, _ in sweep.run_sweep(
      config_path, None, overrides, str(root), task_index=i, num_tasks=2)) for i in (0, 1)]
  assert shares == [["method=lw,seed=0", "method=lw,seed=1"], ["method=baseline,seed=0"]]


def test_grouped_sweep_agrees_with_one_run_per_program_within_noise(data_dir, tmp_path):
  # The equivalence of the study, on a small one: 4 seeds of LW (2 stages: training, a
  # switch with calibration, training again) trained grouped (data drawn on device) and one
  # run per program (tf.data); the mean test accuracy agrees within 2 x the combined standard
  # error + 0.5 points (launch.compare_studies; the digits study's figures are in the README).
  from launch import compare_studies  # pylint: disable=g-import-not-at-top
  from launch import sweep  # pylint: disable=g-import-not-at-top
  config_path = _sweep_config(tmp_path / "study.py", [dict(method="lw", seed=s) for s in range(4)])
  overrides = {"data_dir": data_dir, "width": 0.25, "train_examples": 60, "batch_size": 20,
               "eval_batch_size": 500, "epochs_per_stage": 4, "num_stages": 2,
               "num_devices": 1}
  for mode, runs_per_program in (("grouped", 0), ("single", 1)):
    sweep.run_sweep(config_path, None, overrides, str(tmp_path / mode),
                    runs_per_program=runs_per_program)
  rows = compare_studies.compare(str(tmp_path / "grouped"), str(tmp_path / "single"))
  (row,) = rows
  assert (row["method"], row["seeds"], row["other_seeds"]) == ("lw", 4, 4)
  assert row["agree"], row
  assert row["mean"] > 0.3  # they learned (10 classes)
  # Not one computation twice: the two ways draw their batches differently.
  assert row["difference"] != 0


def test_runs_one_after_another_equal_vmapped_runs(groups_run, data_dir):
  root, (all_dirs, _), _ = groups_run
  workdirs = [os.path.join(root, "map", f"seed{s}") for s in SEEDS]
  group_train.train_group(_config(data_dir), SEEDS, workdirs, over_runs="map")
  for mapped, vmapped in zip(workdirs, all_dirs):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 _variables(mapped, "final"), _variables(vmapped, "final"))


def test_train_accuracy_read_on_device_equals_the_pipelines(groups_run, data_dir):
  # The group evaluates each run's training subset from its images on device; the single run's
  # tf.data train-eval set of the same seed, evaluated with the run's final variables, gives
  # the same accuracy (an independent pipeline: decoding, subset, normalization, padding).
  from reinit import data as data_lib  # pylint: disable=g-import-not-at-top
  from reinit import evaluation  # pylint: disable=g-import-not-at-top
  from reinit import models  # pylint: disable=g-import-not-at-top
  _, (all_dirs, all_results), _ = groups_run
  for seed, workdir, result in zip(SEEDS, all_dirs, all_results):
    config = _config(data_dir, seed=seed)
    data = data_lib.Data(config)
    model = models.from_config(config, data.info.num_classes, runs=len(SEEDS))
    step = jax.jit(evaluation.make_eval_step(model, num_classes=data.info.num_classes))
    expected = evaluation.evaluate(step, _variables(workdir, "final"),
                                   data.train_eval().as_numpy_iterator())
    assert result["train_accuracy"] == expected["accuracy"]
    np.testing.assert_allclose(result["stages"][-1]["train_loss"], expected["loss"], rtol=1e-5)
    assert expected["examples"] == config.train_examples


def test_a_group_out_of_memory_is_one_line_naming_runs_per_program(data_dir, tmp_path,
                                                                    monkeypatch):
  def exhausted(*args):  # a real allocation failure of XLA, where a window runs
    del args
    return jax.jit(lambda: jnp.ones((2**41,), jnp.float32))().block_until_ready()
  monkeypatch.setattr(group_train, "_train_window", exhausted)
  with pytest.raises(train.ConfigError) as error:
    _group(_config(data_dir), str(tmp_path), "g", SEEDS)
  message = str(error.value)
  assert "\n" not in message
  assert "runs_per_program=3 runs does not fit" in message
  assert "accepted: runs_per_program=1..2" in message
  assert "RESOURCE_EXHAUSTED" in message
  # Other runtime errors are not dressed up as memory errors.
  assert group_train.out_of_memory_error(ValueError("RESOURCE_EXHAUSTED"), 3) is None


def test_runs_spread_over_devices_equal_runs_on_one_device(data_dir, tmp_path):
  # 2 runs on 4 host devices (a 2 x 2 mesh: a row of 2 devices a run, each run data-parallel
  # over its row) and on one device: the same start bit for bit, the same end to rtol 1e-5.
  # (The engine's tests spread runs alone, one a device: tests/test_groups.py.)
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  seeds = SEEDS[:2]
  alone, alone_results = _group(_config(data_dir, num_devices=1), str(tmp_path), "alone", seeds)
  spread, results = _group(_config(data_dir, num_devices=4), str(tmp_path), "on4", seeds)
  for a, b, result, expected in zip(spread, alone, results, alone_results):
    jax.tree.map(np.testing.assert_array_equal, _variables(a, "init"), _variables(b, "init"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 _variables(a, "final"), _variables(b, "final"))
    assert result["devices"] == 4
    np.testing.assert_allclose(result["test_accuracy"], expected["test_accuracy"], atol=1e-6)


def test_group_devices_spread_runs_then_split_each_runs_batch(data_dir):
  def mesh(runs, num_devices):
    return group_train.group_devices(_config(data_dir, num_devices=num_devices), runs)
  assert mesh(2, 1) == (1, 1)
  assert mesh(2, 2) == (2, 1)
  assert mesh(2, 8) == (2, 4)  # each run's batch over 4 devices
  assert mesh(3, 8) == (1, 8)  # no common divisor: every run over all 8
  assert mesh(8, 8) == (8, 1)
  assert mesh(12, 8) == (4, 2)
  assert mesh(4, -1) == (math.gcd(4, jax.device_count()),
                         jax.device_count() // math.gcd(4, jax.device_count()))


# ---------------------------------------------------------------- batches read on the host


def test_host_fed_group_trains_each_run_as_the_run_alone(groups_run, alone, data_dir,
                                                         tmp_path):
  # data_on='host': run i reads its own tf.data streams (training and LW's calibration after
  # the switch), so it is the seed's single run, up to the vmapped step's float rounding.
  workdirs, results = _group(_config(data_dir), str(tmp_path), "fed", SEEDS, data_on="host")
  alone_dir, single = alone
  result = results[1]  # SEEDS[1], between two other runs
  assert result["test_accuracy"] == single["test_accuracy"]
  assert result["train_accuracy"] == single["train_accuracy"]
  np.testing.assert_allclose([s["test_loss"] for s in result["stages"]],
                             [s["test_loss"] for s in single["stages"]], rtol=1e-4)
  # Every leaf, the calibrated standardization included.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
               _variables(workdirs[1], "final"), _variables(alone_dir, "final"))
  # Not the device-drawn batches of data_on='device' (the default at this size).
  _, (_, drawn), _ = groups_run
  assert [s["test_loss"] for s in drawn[1]["stages"]] != [
      s["test_loss"] for s in result["stages"]]


# Killed in stage 1 one window after the checkpoint of step 9: the streams skip what the group
# consumed (9 training steps, stage 1's calibration batches). Fed a step per call (input bytes
# capped): killed after step 7, in a window, it resumes from the checkpoint of step 6.
@pytest.mark.parametrize("input_bytes,calls,resumed_at", [(None, 7, 9), (1, 7, 6)])
def test_host_fed_group_resumes_exactly(data_dir, tmp_path, monkeypatch, input_bytes, calls,
                                        resumed_at):
  if input_bytes is not None:
    monkeypatch.setattr(group_train, "FED_INPUT_BYTES", input_bytes)
  config = _config(data_dir, epochs_per_stage=2, checkpoint_every_steps=3)
  expected = _group(config, str(tmp_path), "unbroken", SEEDS[:2], data_on="host")
  with pytest.MonkeyPatch.context() as killing:
    _killed_then_resumed_equals(expected, config, tmp_path, killing, calls, resumed_at,
                                data_on="host")


def test_fed_chunks_cut_a_window_into_calls_of_at_most_chunk_steps():
  assert group_train._fed_chunks(7, 3) == [3, 3, 1]  # pylint: disable=protected-access
  assert group_train._fed_chunks(6, 3) == [3, 3]  # pylint: disable=protected-access
  assert group_train._fed_chunks(2, 100) == [2]  # pylint: disable=protected-access


def test_data_placement_puts_small_unions_on_device_and_large_ones_on_the_host():
  limit = group_train.DEVICE_DATA_LIMIT_BYTES
  assert group_train.data_placement("auto", limit // 3072, (32, 32, 3)) == "device"
  assert group_train.data_placement("auto", limit // 3072 + 1, (32, 32, 3)) == "host"
  assert group_train.data_placement("host", 10, (8, 8, 1)) == "host"
  assert group_train.data_placement("device", 10**9, (32, 32, 3)) == "device"
  with pytest.raises(train.ConfigError, match="data_on='disk' is unknown; accepted: auto, "
                     "device, host"):
    group_train.data_placement("disk", 10, (8, 8, 1))


def test_host_fed_and_device_groups_never_restore_each_others_checkpoints():
  # Their batches differ: a checkpoint of one continued by the other would match neither.
  device = group_train.group_dir_of(["/r/seed0", "/r/seed1"], [0, 1])
  host = group_train.group_dir_of(["/r/seed0", "/r/seed1"], [0, 1], "host")
  assert device == "/r/seed0.seeds=0-1.group" and host == "/r/seed0.seeds=0-1.host.group"


def test_variables_of_a_groups_runs_saved_together_land_each_in_its_own_workdir(tmp_path):
  """`save_variables_of_runs` writes the runs' saves in flight together: each run's directory
  gets its own tree (a mix-up or a save not waited for would fail), as `save_variables` does."""
  trees = [{"params": {"w": np.full((3, 2), i, np.float32), "b": np.arange(2.0) + i}}
           for i in range(3)]
  workdirs = [str(tmp_path / f"run{i}") for i in range(3)]
  workdir_lib.save_variables_of_runs(workdirs, "init", trees)
  workdir_lib.save_variables(str(tmp_path / "alone"), "init", trees[1])
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  def read(workdir):
    return ocp.StandardCheckpointer().restore(
        os.path.join(workdir, workdir_lib.VARIABLES_DIR, "init"))
  for workdir, tree in zip([*workdirs, str(tmp_path / "alone")], [*trees, trees[1]]):
    jax.tree.map(np.testing.assert_array_equal, read(workdir), tree)
  with pytest.raises(ValueError):  # one tree a workdir
    workdir_lib.save_variables_of_runs(workdirs, "final", trees[:2])
