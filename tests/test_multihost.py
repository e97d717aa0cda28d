"""Multi-host runs for real: two processes on this machine (a localhost coordinator, CPU
collectives, 4 host devices each) must compute what one process with 8 devices computes.

LW is the method under test: its calibration reads training batches outside the train step, so
it is where a host-local batch could pass for a global one.
"""

import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# One process of a run: `launch.main` as on a cluster, with `jax.distributed.initialize` given
# the localhost coordinator explicitly (`--distributed` leaves it to cluster auto-detection).
_DRIVER = """
import sys
from launch import common  # the XLA and TF environment, before jax is imported
import jax
rank, count, port = map(int, sys.argv[1:4])
if count > 1:
  jax.distributed.initialize(f"localhost:{port}", num_processes=count, process_id=rank)
  assert jax.process_count() == count and jax.device_count() == 8, jax.devices()
from launch import main
sys.argv = ["launch.main", *sys.argv[4:]]
common.run_app(main.main)
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


def _run(workdir, data_dir, processes: int):
  """Runs the tiny LW config on 8 devices split over `processes` processes."""
  args = ["--config=configs/digits.py:method=lw", f"--config.data_dir={data_dir}",
          "--config.width=0.25", "--config.train_examples=100", "--config.batch_size=32",
          "--config.epochs_per_stage=1", "--config.num_stages=2", f"--workdir={workdir}"]
  port = _free_port()
  # Logs to files, not pipes: a child blocked on a full pipe would stall its peers' collectives.
  logs = [pathlib.Path(f"{workdir}.{rank}.log") for rank in range(processes)]
  children = []
  try:
    for rank, log in enumerate(logs):
      with open(log, "w") as out:
        children.append(subprocess.Popen(
            [sys.executable, "-c", _DRIVER, str(rank), str(processes), str(port), *args],
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
def runs(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
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
  leaves_one, leaves_two = _leaves(one.final_variables), _leaves(two.final_variables)
  for path in leaves_one:
    np.testing.assert_allclose(leaves_two[path], leaves_one[path], rtol=1e-4, atol=1e-6,
                               err_msg=path)
  stages_one, stages_two = one.results["stages"], two.results["stages"]
  assert len(stages_one) == len(stages_two) == 2
  for a, b in zip(stages_one, stages_two):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=f"stage {a['stage']} {key}")
  assert one.results["devices"] == two.results["devices"] == 8

