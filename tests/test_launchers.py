"""The cluster scripts parse and print real commands; a sweep prints one command per run."""

import math
import os
import pathlib
import re
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _bash(script, *args, env=None):
  return subprocess.run(["bash", str(REPO / "launch" / script), *args], capture_output=True,
                        text=True, env={**os.environ, **(env or {})}, timeout=60, cwd=REPO)


def test_scripts_parse():
  for script in ("tpu_pod.sh", "slurm_gpu.sh", "slurm/local_cluster.sh"):
    subprocess.run(["bash", "-n", str(REPO / "launch" / script)], check=True)


def test_tpu_pod_dry_run_prints_gcloud_commands():
  env = {"DRY_RUN": "1", "TPU_NAME": "pod", "ZONE": "us-central2-b"}
  create = _bash("tpu_pod.sh", "create", env=env)
  assert create.returncode == 0, create.stderr
  assert create.stdout.startswith("gcloud compute tpus tpu-vm create pod --zone=us-central2-b")
  run = _bash("tpu_pod.sh", "run", "--config=configs/paper.py:study=full", "--workdir=gs://b/r",
              env=env)
  assert "--worker=all" in run.stdout and "launch.main\\ --distributed" in run.stdout
  assert "--workdir=gs://b/r" in run.stdout
  assert _bash("tpu_pod.sh", "bogus", env=env).returncode == 2
  missing = _bash("tpu_pod.sh", "create", env={"DRY_RUN": "1", "TPU_NAME": "", "ZONE": ""})
  assert missing.returncode != 0 and "TPU_NAME" in missing.stderr


def test_slurm_dry_run_prints_srun_command():
  out = _bash("slurm_gpu.sh", "--config=configs/digits.py", "--workdir=/shared/run",
              env={"DRY_RUN": "1"})
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["srun", "--kill-on-bad-exit=1", "python", "-m", "launch.main",
                                "--distributed", "--config=configs/digits.py",
                                "--workdir=/shared/run"]


def _dry_run(tmp_path, *extra) -> list[str]:
  proc = subprocess.run([sys.executable, "-m", "launch.sweep",
                         "--config=configs/paper.py:study=digits", f"--workdir={tmp_path}",
                         "--dry_run", "--config.epochs_per_stage=3", *extra],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert not any(tmp_path.iterdir())  # nothing run, nothing written
  return proc.stdout.strip().splitlines()


def test_sweep_dry_run_prints_one_command_per_program(tmp_path):
  # Default: the 3 seeds of each of the 12 methods are one program, program i of 12.
  commands = _dry_run(tmp_path)
  assert commands == [
      f"python -m launch.sweep --config=configs/paper.py:study=digits --workdir={tmp_path} "
      f"--task_index={i} --num_tasks=12 --runs_per_program=0 --config.epochs_per_stage=3"
      for i in range(12)]
  # Groups capped at 2 seeds: 2 programs per method.
  assert len(_dry_run(tmp_path, "--runs_per_program=2")) == 24
  # One run per program: 36 launch.main commands.
  commands = _dry_run(tmp_path, "--runs_per_program=1")
  assert len(commands) == 12 * 3
  assert all(c.startswith("python -m launch.main --config=configs/paper.py:study=digits,method=")
             for c in commands)
  assert all("--config.epochs_per_stage=3" in c for c in commands)
  assert any("method=lw" in c and "--config.seed=2" in c for c in commands)


def test_grown_digits_study_is_5_seeds_of_3_sizes_at_about_30_steps_a_stage():
  from configs import paper  # pylint: disable=g-import-not-at-top
  from launch import sweep  # pylint: disable=g-import-not-at-top
  runs = sweep.runs_of("configs/paper.py", "study=digits_grown", {})
  assert len(runs) == 12 * 5 * 3
  sizes = sorted({config.train_examples for _, _, config in runs})
  assert sizes == [50, 100, 200]
  for _, _, config in runs:
    steps_a_stage = math.ceil(config.train_examples / config.batch_size) * config.epochs_per_stage
    assert 28 <= steps_a_stage <= 32, (config.train_examples, steps_a_stage)
    assert (config.dataset, config.width) == ("digits", 0.5)
  # All seeds of a combination are one program: 12 methods x 3 sizes.
  assert len(sweep.program_groups([config for _, _, config in runs])) == 36
  # The analyzed runs are runs of the study.
  for wanted in paper.analyzed_runs("study=digits_grown"):
    assert sum(all(run.get(k) == v for k, v in wanted.items()) for _, run, _ in runs) == 1


def test_reproduce_runs_a_small_sweep_then_reports_and_skips_finished_runs(tmp_path):
  data_dir = tmp_path / "tfds"
  command = [sys.executable, "-m", "launch.reproduce", "configs/digits.py",
             f"--workdir={tmp_path / 'runs'}", f"--config.data_dir={data_dir}",
             "--config.width=0.125", "--config.train_examples=20", "--config.batch_size=16",
             "--config.epochs_per_stage=1", "--config.num_stages=2"]
  first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  report = tmp_path / "runs" / "report"
  for name in ("table2.md", "table3.md", "gain_vs_size.png", "per_dataset.png",
               "compute_vs_accuracy.png"):
    assert (report / name).exists(), name
  table2 = (report / "table2.md").read_text()
  assert all(method in table2 for method in ("baseline", "baseline_long", "lw"))
  assert "| digits | simple_cnn | 20 |" in first.stdout
  # Overall progress: runs done of 3, with the time per run and an ETA once one has run.
  progress = re.findall(r"\[(\d)/3 runs(, .* per run, ETA .*)?\]", first.stdout)
  assert [int(done) for done, _ in progress] == [1, 2, 3] and all(eta for _, eta in progress)
  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("finished earlier, skipped") == 3
  assert "finished earlier, skipped [3/3 runs]" in again.stdout  # skipped runs are not timed


def _remote_commands(stdout: str) -> list[str]:
  """The --command=... of every gcloud ssh line a dry run printed."""
  commands = []
  for line in stdout.splitlines():
    args = shlex.split(line)
    commands += [a.split("=", 1)[1] for a in args if a.startswith("--command=")]
  return commands


def test_tpu_pod_setup_makes_a_python_311_venv_with_uv():
  out = _bash("tpu_pod.sh", "setup", env={"DRY_RUN": "1", "TPU_NAME": "pod", "ZONE": "z"})
  assert out.returncode == 0, out.stderr
  (remote,) = _remote_commands(out.stdout)
  assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0
  assert "uv venv --python 3.11 ~/reinit-venv" in remote
  assert "--python ~/reinit-venv/bin/python -e '.[train]' 'jax[tpu]'" in remote
  run = _bash("tpu_pod.sh", "run", "--workdir=gs://b/r",
              env={"DRY_RUN": "1", "TPU_NAME": "pod", "ZONE": "z"})
  assert "~/reinit-venv/bin/python -m launch.main --distributed" in _remote_commands(run.stdout)[0]


def test_tpu_pod_sweep_hosts_run_disjoint_shares_that_cover_the_sweep(tmp_path):
  # The hosts' generated commands, run here: the venv's python is this one, DIR this repo.
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").symlink_to(sys.executable)
  sweep_args = ["--config=configs/paper.py:study=digits", f"--workdir={tmp_path / 'runs'}",
                "--dry_run"]
  out = _bash("tpu_pod.sh", "sweep", *sweep_args,
              env={"DRY_RUN": "1", "TPU_NAME": "pod", "ZONE": "z", "HOSTS": "3",
                   "DIR": str(REPO), "VENV": str(venv)})
  assert out.returncode == 0, out.stderr
  remote = _remote_commands(out.stdout)
  assert [re.search(r"--task_index=(\d) --num_tasks=3", c).group(1) for c in remote] == [
      "0", "1", "2"]
  shares = [subprocess.run(["bash", "-c", c], capture_output=True, text=True, timeout=300)
            for c in remote]
  assert all(s.returncode == 0 for s in shares), [s.stderr[-2000:] for s in shares]
  full = subprocess.run([sys.executable, "-m", "launch.sweep", *sweep_args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  everything = full.stdout.strip().splitlines()
  got = [s.stdout.strip().splitlines() for s in shares]
  assert len(everything) == 12 and sorted(sum(got, [])) == sorted(everything)  # 12 programs
  assert got[1] == everything[1::3]  # a deterministic share: every third run from the second


def test_sweep_refuses_a_task_index_outside_num_tasks(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "launch.sweep", "--config=configs/digits.py",
                         f"--workdir={tmp_path}", "--task_index=2", "--num_tasks=2"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == ["error: task_index=2 is invalid; accepted: 0..1"]
  assert not any(tmp_path.iterdir())



def test_progress_line_by_hand():
  from launch import common
  assert common.progress_line(0, 36, []) == "0/36 runs"
  # 2 timed runs of 10 and 20 s: 15 s per run; 7 of 10 left: 105 s.
  assert common.progress_line(3, 10, [10.0, 20.0]) == "3/10 runs, 15 s per run, ETA 105 s"
  # 40 left at 90 s: 3600 s = 60 min; 100 left at 300 s: 30000 s = 8.3 h.
  assert common.progress_line(4, 44, [90.0], "analysis", "analyses") == (
      "4/44 analyses, 90 s per analysis, ETA 60.0 min")
  assert common.progress_line(0, 100, [300.0]) == "0/100 runs, 5.0 min per run, ETA 8.3 h"
  progress = common.Progress(3)
  assert progress.step() == "1/3 runs"             # skipped: counted, not timed
  assert progress.step(30.0) == "2/3 runs, 30 s per run, ETA 30 s"
  assert progress.step(50.0) == "3/3 runs, 40 s per run, ETA 0 s"


def test_distributed_refuses_what_it_cannot_run_in_one_line(tmp_path):
  # launch.sweep: not with a scheduler, a dry run or a share of the sweep; launch.reproduce:
  # not at all (it defines the flag by importing launch.sweep).
  for program, extra, accepted in (
      ("launch.sweep", ["--dry_run"], "--scheduler=local"),
      ("launch.sweep", ["--scheduler=slurm"], "--scheduler=local"),
      ("launch.sweep", ["--num_tasks=2"], "--num_tasks=1"),
      ("launch.reproduce", [], "launch.sweep --distributed")):
    proc = subprocess.run([sys.executable, "-m", program, "--config=configs/digits.py",
                           f"--workdir={tmp_path}", "--distributed", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "distributed" in lines[0] and accepted in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_distributed_outside_a_cluster_fails_in_one_line(tmp_path):
  # No cluster for jax.distributed.initialize() to detect: one line, status 2, nothing written.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR"))}
  for program in ("launch.main", "launch.sweep"):
    workdir = tmp_path / program
    proc = subprocess.run([sys.executable, "-m", program, "--config=configs/digits.py",
                           f"--workdir={workdir}", "--distributed"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: distributed:"), lines
    assert "initialize" in lines[0] and "accepted:" in lines[0], lines
    assert not workdir.exists()
