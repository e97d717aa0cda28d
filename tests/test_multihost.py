"""Multi-host runs for real: two processes on this machine (a localhost coordinator, CPU
collectives, 4 host devices each) must compute what one process with 8 devices computes, for
one run (`launch.main`) and for a group of runs (`launch.sweep`, `reinit.group_train`).

LW is the method under test: its calibration reads training batches outside the train step, so
it is where a host-local batch could pass for a global one; in a group, each run's state,
metrics and evaluation live on another process's devices.
"""

import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# One process of a program: `launch.main` or `launch.sweep` (argv[4]) as on a cluster, with
# `jax.distributed.initialize` given the localhost coordinator explicitly (`--distributed`
# leaves it to cluster auto-detection).
_DRIVER = """
import importlib
import sys
from launch import common  # the XLA and TF environment, before jax is imported
import jax
rank, count, port = map(int, sys.argv[1:4])
if count > 1:
  jax.distributed.initialize(f"localhost:{port}", num_processes=count, process_id=rank)
  assert jax.process_count() == count and jax.device_count() == 8, jax.devices()
program = importlib.import_module(sys.argv[4])
sys.argv = [sys.argv[4], *sys.argv[5:]]
common.run_app(program.main)
"""
# Two seeds of the tiny LW run: one group of 2 runs, each data-parallel over 4 devices (in
# two processes: one run on each process's devices), checkpointed every 2 steps.
_GROUP_SWEEP = """
from configs import digits


def get_config(arg=None):
  config = digits.get_config("method=lw")
  config.update(width=0.25, train_examples=100, batch_size=32, epochs_per_stage=1, num_stages=2,
                checkpoint_every_steps=2)
  return config


def get_sweep(arg=None):
  return [dict(seed=0), dict(seed=1)]
"""
_TIMEOUT_S = 600  # a loaded 2-core machine; the runs take ~70 CPU-seconds in all


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _environment(local_devices: int) -> dict:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={local_devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  # Cross-process CPU collectives: jax 0.10's default, named for older jax (default: none).
  env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  return env


def _run(workdir, data_dir, processes: int, program: str = "launch.main", config=None):
  """Runs the tiny LW config (`launch.main`), or the sweep `config` (`launch.sweep`), on 8
  devices split over `processes` processes."""
  if program == "launch.main":
    args = ["--config=configs/digits.py:method=lw", "--config.width=0.25",
            "--config.train_examples=100", "--config.batch_size=32",
            "--config.epochs_per_stage=1", "--config.num_stages=2"]
  else:
    args = [f"--config={config}"]
  args += [f"--config.data_dir={data_dir}", f"--workdir={workdir}"]
  port = _free_port()
  # Logs to files, not pipes: a child blocked on a full pipe would stall its peers' collectives.
  logs = [pathlib.Path(f"{workdir}.{rank}.log") for rank in range(processes)]
  children = []
  try:
    for rank, log in enumerate(logs):
      with open(log, "w") as out:
        children.append(subprocess.Popen(
            [sys.executable, "-c", _DRIVER, str(rank), str(processes), str(port), program,
             *args],
            cwd=REPO, env=_environment(8 // processes), stdout=out, stderr=subprocess.STDOUT))
    for child in children:
      child.wait(timeout=_TIMEOUT_S)
  finally:
    for child in children:  # a failed peer leaves the others waiting on a collective
      if child.poll() is None:
        child.kill()
        child.wait()
  for child, log in zip(children, logs):
    assert child.returncode == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  one, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_processes")
  _run(one, data_dir, 1)  # first alone: it also builds the digits dataset
  _run(two, data_dir, 2)
  return one, two


def _leaves(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_leaves(value, f"{prefix}{key}/"))
    return out
  return {prefix[:-1]: np.asarray(tree)}


def test_two_processes_compute_what_one_does(runs):
  from reinit import workdir as workdir_lib
  one, two = (workdir_lib.load_run(str(workdir)) for workdir in runs)
  # The standardization calibrated at stage 1, over the global batches.
  norm_one, norm_two = _leaves(one.final_variables["norm"]), _leaves(two.final_variables["norm"])
  assert norm_one.keys() == norm_two.keys()
  active = [path.split("/")[0] for path, value in norm_one.items()
            if path.endswith("active") and value == 1.0]
  assert active, norm_one
  for path in norm_one:
    np.testing.assert_allclose(norm_two[path], norm_one[path], rtol=1e-5, atol=1e-7,
                               err_msg=path)
  # And everything trained on top of them.
  _assert_same_run(one, two)


def _assert_same_run(one, two, name=""):
  """Runs `one` and `two` (`load_run`) trained alike up to the rounding of cross-process
  reductions: every final leaf to 1e-4, every stage's metrics to 1e-5, on 8 devices."""
  leaves_one, leaves_two = _leaves(one.final_variables), _leaves(two.final_variables)
  assert leaves_one.keys() == leaves_two.keys()
  for path in leaves_one:
    np.testing.assert_allclose(leaves_two[path], leaves_one[path], rtol=1e-4, atol=1e-6,
                               err_msg=f"{name} {path}")
  stages_one, stages_two = one.results["stages"], two.results["stages"]
  assert len(stages_one) == len(stages_two) == 2
  for a, b in zip(stages_one, stages_two):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5,
                                 err_msg=f"{name} stage {a['stage']} {key}")
  assert one.results["devices"] == two.results["devices"] == 8


@pytest.fixture(scope="module")
def group_runs(tmp_path_factory, data_dir):
  from launch import sweep  # pylint: disable=g-import-not-at-top
  config = tmp_path_factory.mktemp("sweep") / "group_sweep.py"
  config.write_text(_GROUP_SWEEP)
  one, two = tmp_path_factory.mktemp("group_one"), tmp_path_factory.mktemp("group_two")
  # One process with 8 devices: this one (tests/conftest.py); it also builds the dataset.
  sweep.run_sweep(str(config), None, {"data_dir": str(data_dir)}, str(one))
  _run(two, data_dir, 2, "launch.sweep", config)
  # Then as if stopped after an earlier checkpoint: the two processes resume from it.
  checkpoints = two / "seed=0.seeds=0-1.group" / "checkpoints"
  steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  shutil.rmtree(checkpoints / str(steps[-1]))
  for seed in (0, 1):
    (two / f"seed={seed}" / "results.json").unlink()
  _run(two, data_dir, 2, "launch.sweep", config)
  return one, two, steps[-2]


def test_a_group_over_two_processes_computes_what_one_process_does(group_runs):
  from reinit import workdir as workdir_lib
  *roots, resumed_at = group_runs
  for root in roots:  # trained as one program: the group's checkpoints
    assert (root / "seed=0.seeds=0-1.group").is_dir(), sorted(p.name for p in root.iterdir())
  for seed in (0, 1):
    one, two = (workdir_lib.load_run(str(root / f"seed={seed}")) for root in roots)
    assert one.results["resumed_from"] == [] and two.results["resumed_from"] == [resumed_at]
    assert any(path.endswith("active") and value == 1.0
               for path, value in _leaves(one.final_variables).items())  # LW calibrated
    _assert_same_run(one, two, f"seed {seed}")
  # The first process alone prints the sweep's progress and table (the resumed call's logs).
  first, other = (pathlib.Path(f"{roots[1]}.{rank}.log").read_text() for rank in (0, 1))
  assert "running as one program" in first and "| run |" in first, first[-3000:]
  assert "running as one program" not in other and "| run |" not in other, other[-3000:]
  # The seeds are different runs (a gather that mixed up the runs would not be seen otherwise).
  first, second = (workdir_lib.load_run(str(roots[1] / f"seed={s}")) for s in (0, 1))
  assert first.results["stages"] != second.results["stages"]
