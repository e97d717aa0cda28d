"""The digits sweep as a Slurm job array on a live cluster ends as the sequential sweep does.

Needs a reachable Slurm (`launch/slurm/local_cluster.sh up` starts a single-node one; CI does);
skipped with the reason otherwise. One scenario, shared by the tests below (module fixture):
the sequential `launch.reproduce` (reference) and, at the same time, the sweep submitted as an
array with two tasks at a time, each task one program (the group of a combination's seeds; the
digits sweep has one seed per method, so three programs of one run); the third task is
cancelled while it waits; the second gets, in the middle of its training, the signal Slurm
sends before a time limit. Then `launch.reproduce --scheduler=slurm` submits what is unfinished
(the third program), which an administrator requeues (`scontrol requeue`) in the middle of its
training, waits and writes the report.
"""

import fcntl
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

from launch.slurm import array

REPO = pathlib.Path(__file__).resolve().parents[1]
RUNS = ("method=baseline", "method=baseline_long", "method=lw")  # array tasks 0, 1, 2
# 64 examples / batch 16 = 4 steps per epoch, 25 epochs per stage: 100 steps per stage;
# baseline_long trains 300 steps in one stage, checkpointed at step 50 (the requeue's cue: it
# is then surely training).
_TINY = ["--config.width=0.125", "--config.train_examples=64", "--config.batch_size=16",
         "--config.epochs_per_stage=25", "--config.num_stages=3",
         "--config.checkpoint_every_steps=50"]


def _slurm_unreachable() -> str | None:
  if shutil.which("sbatch") is None:
    return "no Slurm client (sbatch) on this machine"
  ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
  if ping.returncode or "UP" not in ping.stdout:
    return f"no Slurm controller answers `scontrol ping`: {' '.join(ping.stdout.split())}"
  nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
  if not re.search(r"idle|mixed|alloc", nodes.stdout):
    return f"no Slurm node can take jobs (states: {' '.join(nodes.stdout.split())})"
  return None


_UNREACHABLE = _slurm_unreachable()
needs_slurm = pytest.mark.skipif(
    _UNREACHABLE is not None,
    reason=f"needs a live Slurm ({_UNREACHABLE}); start one: launch/slurm/local_cluster.sh up")


def test_sbatch_args_ask_for_gpus_only_when_configured():
  plain = array.sbatch_args(array.Options(), [0, 2, 5], "/w/slurm", chdir="/repo")
  assert not any("gpu" in a or "gres" in a for a in plain)  # refused where there are no GPUs
  assert "--array=0,2,5" in plain and "--requeue" in plain and "--signal=USR1@90" in plain
  assert "--output=/w/slurm/%A_%a.out" in plain and "--open-mode=append" in plain
  assert not any(a.startswith(("--partition", "--time", "--cpus-per-task")) for a in plain)
  full = array.sbatch_args(
      array.Options(partition="gpu", time="2:00:00", gpus_per_task=2, cpus_per_task=8,
                    max_parallel=4, signal_seconds=300), [3], "/w/slurm", chdir="/repo")
  for arg in ("--array=3%4", "--partition=gpu", "--time=2:00:00", "--gpus-per-task=2",
              "--cpus-per-task=8", "--signal=USR1@300", "--ntasks=1"):
    assert arg in full, arg


def _run_job_script(tmp_path, task: int, exit_status: int):
  """The job script of tasks 3 and 7 run as Slurm would run task `task`, with `srun` and
  `scontrol` replaced by stubs that log their arguments."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  log = tmp_path / "calls"
  (bin_dir / "srun").write_text(f'#!/bin/sh\necho "srun $*" >> {log}\nshift\nexec "$@"\n')
  (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "scontrol $*" >> {log}\n')
  for stub in ("srun", "scontrol"):
    (bin_dir / stub).chmod(0o755)
  script = tmp_path / "array.sh"
  script.write_text(array.job_script(
      {3: ["sh", "-c", f"echo 'run 3' >> {log}; exit {exit_status}"],
       7: ["sh", "-c", f"echo 'run 7' >> {log}"]}, preempted_status=75))
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_JOB_ID": "41"}
  proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                        timeout=60)
  calls = log.read_text().splitlines() if log.exists() else []
  log.unlink(missing_ok=True)
  return proc.returncode, calls


def test_job_script_runs_its_task_and_requeues_it_only_after_a_preemption(tmp_path):
  assert _run_job_script(tmp_path, 7, 0) == (0, ["srun --ntasks=1 sh -c echo 'run 7' >> "
                                                 f"{tmp_path / 'calls'}", "run 7"])
  status, calls = _run_job_script(tmp_path, 3, 75)
  assert status == 75 and calls[1:] == ["run 3", "scontrol requeue 41_3"]
  status, calls = _run_job_script(tmp_path, 3, 1)  # a failure is not retried
  assert status == 1 and calls[1:] == ["run 3"]
  assert _run_job_script(tmp_path, 5, 0) == (2, [])  # no such task


def _state(job_task: str) -> str:
  out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_task, "-o", "%T"],
                       capture_output=True, text=True, timeout=30).stdout.split()
  return out[0] if out else "UNKNOWN"


def _wait_for(predicate, what: str, timeout_s: float = 300):
  deadline = time.monotonic() + timeout_s
  while not predicate():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.1)


def _sweep_command(module: str, workdir, data_dir, *extra) -> list[str]:
  return [sys.executable, "-m", module, "--config=configs/digits.py", f"--workdir={workdir}",
          f"--config.data_dir={data_dir}", *_TINY, *extra]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
  """The scenario's observations; run once per test session, also under pytest-xdist (whose
  workers each build module fixtures): the first worker runs it, the others read its record."""
  session = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp is SESSION/popen-gwN
    session = session.parent
  shared = session / "slurm-scenario"
  shared.mkdir(exist_ok=True)
  record = shared / "scenario.json"
  with open(shared / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not record.exists():
      record.write_text(json.dumps(_run_scenario(shared)))
  observed = json.loads(record.read_text())
  assert "error" not in observed, observed.get("error")
  return {**observed, "tmp": pathlib.Path(observed["tmp"])}


def _run_scenario(tmp: pathlib.Path) -> dict:
  try:
    return _scenario(tmp)
  except Exception as e:  # pylint: disable=broad-except
    # Recorded, so that every worker fails with it instead of running the scenario again.
    return {"error": f"{type(e).__name__}: {e}"}


def _requeue_when_training(job_task: str, checkpoint: pathlib.Path, how: list[str]):
  """Once `checkpoint` exists (the run surely trains), stops the task with `how` (a command,
  to which the task id is appended) and releases it as soon as it is pending again."""
  _wait_for(checkpoint.is_dir, f"{job_task} to train")
  subprocess.run([*how, job_task], check=True, timeout=30)
  _wait_for(lambda: _state(job_task) == "PENDING", f"{job_task} to be pending again")
  # Else Slurm holds a requeued job ~2 minutes (Reason=BeginTime). Not `now`: slurmd revoked
  # the old run's credential, and a new one issued within the same second (Slurm's timestamps
  # are whole seconds) counts as revoked too ("Killing non-startable batch job: Job credential
  # revoked", the task then FAILED); a few seconds later it starts.
  subprocess.run(["scontrol", "update", f"jobid={job_task}", "StartTime=now+5"], check=True,
                 timeout=30)


def _checkpoint(root: pathlib.Path, run: str, step: int) -> pathlib.Path:
  """Where the program of `run` (a group of its one seed, 0) checkpoints `step`."""
  return root / f"{run}.seeds=0.group" / "checkpoints" / str(step)


def _submissions(slurm_dir: str) -> list[dict]:
  try:
    return array.read_submissions(slurm_dir)
  except ValueError:  # a line being written
    return []


def _scenario(tmp: pathlib.Path) -> dict:
  data_dir = tmp / "tfds"
  # Built once, before processes that would race to build it.
  subprocess.run([sys.executable, "-c", "import tensorflow_datasets as tfds, reinit.data.digits; "
                  f"tfds.builder('digits', data_dir='{data_dir}').download_and_prepare()"],
                 cwd=REPO, check=True, capture_output=True, timeout=300)
  sequential = subprocess.Popen(_sweep_command("launch.reproduce", tmp / "seq", data_dir),
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
  arr = tmp / "arr"
  first = subprocess.run(
      _sweep_command("launch.sweep", arr, data_dir, "--scheduler=slurm",
                     "--slurm.max_parallel=2"),
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert first.returncode == 0, first.stderr[-3000:]
  job = re.search(r"submitted 3 of 3 programs as job array (\d+)", first.stdout).group(1)
  # While its tasks are queued, a submission whose task ids would mean other programs (one run
  # each) is refused: it could train a run twice at once.
  other_layout = subprocess.run(
      _sweep_command("launch.sweep", arr, data_dir, "--scheduler=slurm", "--runs_per_program=1"),
      cwd=REPO, capture_output=True, text=True, timeout=120)
  # Task 2 waits for one of the two slots: cancelled before it starts.
  subprocess.run(["scancel", f"{job}_2"], check=True, timeout=30)
  # Task 1 gets what Slurm sends before a time limit (--signal=USR1@...: SIGUSR1 to the step):
  # the run checkpoints and exits 75, and the job script requeues the task.
  _requeue_when_training(f"{job}_1", _checkpoint(arr, RUNS[1], 50),
                         ["scancel", "--signal=USR1"])
  _wait_for(lambda: _state(f"{job}_0") == "COMPLETED" and _state(f"{job}_1") == "COMPLETED",
            "tasks 0 and 1 to complete", timeout_s=600)

  second = subprocess.Popen(
      _sweep_command("launch.reproduce", arr, data_dir, "--scheduler=slurm",
                     "--slurm.poll_seconds=1"),
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  slurm_dir = str(arr / "slurm")
  _wait_for(lambda: len(_submissions(slurm_dir)) == 2, "the resubmission")
  job2 = _submissions(slurm_dir)[1]["job_id"]
  # The resubmitted task is requeued by an administrator: SIGTERM, then Slurm requeues it.
  _requeue_when_training(f"{job2}_2", _checkpoint(arr, RUNS[2], 50),
                         ["scontrol", "requeue"])
  second_out, second_err = second.communicate(timeout=600)
  assert second.returncode == 0, second_out[-2000:] + second_err[-3000:]
  _, err = sequential.communicate(timeout=600)
  assert sequential.returncode == 0, err[-3000:]
  return {"tmp": str(tmp), "job": job, "job2": job2, "second": second_out,
          "other_layout": [other_layout.returncode, other_layout.stderr],
          "logs": {RUNS[1]: (arr / "slurm" / f"{job}_1.out").read_text(),
                   RUNS[2]: (arr / "slurm" / f"{job2}_2.out").read_text()}}


def _results(root, name) -> dict:
  return json.loads((root / name / "results.json").read_text())


@needs_slurm
def test_every_run_of_the_array_ends_as_in_the_sequential_sweep(scenario):
  for name in RUNS:
    got, want = _results(scenario["tmp"] / "arr", name), _results(scenario["tmp"] / "seq", name)
    for key in ("stages", "test_accuracy", "train_accuracy", "compute", "units"):
      assert got[key] == want[key], (name, key)


@needs_slurm
def test_the_report_from_the_array_is_the_sequential_one(scenario):
  for name in ("table2.md", "table3.md", "table2.csv", "table3.csv"):
    got = (scenario["tmp"] / "arr" / "report" / name).read_text()
    assert got == (scenario["tmp"] / "seq" / "report" / name).read_text(), name


@needs_slurm
@pytest.mark.parametrize("run,how", [(RUNS[1], "time limit signal"),
                                     (RUNS[2], "scontrol requeue")])
def test_a_requeued_task_resumes_from_the_checkpoint_of_its_step(scenario, run, how):
  results = _results(scenario["tmp"] / "arr", run)
  assert len(results["resumed_from"]) == 1 and results["resumed_from"][0] >= 50, how
  log = scenario["logs"][run]
  # The log is appended to across the requeue: the preempted run, then the resumed one.
  assert "restart 0:" in log and "restart 1:" in log
  assert f"preempted at step {results['resumed_from'][0]}" in log
  if how == "time limit signal":
    assert "checkpointed before the time limit; requeueing" in log


@needs_slurm
def test_resubmission_submits_only_the_cancelled_task(scenario):
  assert re.search(r"submitted 1 of 3 programs as job array \d+ \(tasks 2\)",
                   scenario["second"])
  submissions = array.read_submissions(str(scenario["tmp"] / "arr" / "slurm"))
  assert [s["tasks"] for s in submissions] == [dict(zip("012", RUNS)), {"2": RUNS[2]}]


@needs_slurm
def test_a_submission_of_another_layout_is_refused_while_tasks_are_queued(scenario):
  status, stderr = scenario["other_layout"]
  (line,) = stderr.strip().splitlines()
  assert status == 1 and line.startswith(f"error: job {scenario['job']} still has tasks queued "
                                         "with runs_per_program=0"), line
  assert len(array.read_submissions(str(scenario["tmp"] / "arr" / "slurm"))) == 2  # no other


@needs_slurm
def test_a_gpu_request_on_a_cluster_without_gpus_is_refused_in_one_line(tmp_path):
  gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True,
                        timeout=30).stdout
  if "gpu" in gres:
    pytest.skip("this cluster has GPUs")
  proc = subprocess.run(
      [sys.executable, "-m", "launch.sweep", "--config=configs/digits.py",
       f"--workdir={tmp_path}", "--scheduler=slurm", "--slurm.gpus_per_task=1"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("error: sbatch") and "gres" in line, line
  assert array.read_submissions(str(tmp_path / "slurm")) == []
  assert list((tmp_path / "slurm").iterdir()) == []  # no job script left behind
