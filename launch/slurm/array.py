r"""A sweep as one Slurm job array: submit the unfinished programs, follow them, resubmit failures.

Array task i runs program i of the sweep (`launch.sweep.programs_of`: a group of seeds, or one
run with `--runs_per_program=1`), so a task id names the same runs in every submission of the
same layout. Each submission writes under `WORKDIR/slurm/`: `array-N.sh` (the job script: task
id -> its command), the tasks' logs `JOBID_TASK.out` (appended to across requeues), and a line
in `submissions.jsonl` (job id, layout, task ids and names) that later submissions and `--wait`
read. No `sacct` is needed (clusters without an accounting daemon have none): states come from
`squeue -t all`.

Preemption: tasks are submitted `--requeue --signal=USR1@SECONDS`. Slurm sends SIGUSR1 to the
run that long before the time limit; the run checkpoints its current step and exits with status
75 (`launch.common.PREEMPTED`); the job script then requeues its task, which resumes from that
checkpoint. `scontrol requeue` and preemption by Slurm send SIGTERM: the same checkpoint, and
Slurm requeues the task itself.
"""

import dataclasses
import json
import os
import shlex
import subprocess
import time

SUBMISSIONS_FILE = "submissions.jsonl"
# Task states (squeue's %T). A task in none of these is finished: COMPLETED, or failed (held
# states such as REQUEUE_HOLD wait for a person, so they count as failed, not as pending).
ACTIVE_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_FED", "CONFIGURING", "RUNNING",
                           "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"})
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT"})
DONE_STATE = "COMPLETED"


class SlurmError(RuntimeError):
  """A Slurm command failed or is missing; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Options:
  """What the array asks Slurm for (the `--slurm.*` flags of `launch.sweep`).

  partition: "" for the cluster's default. time: the time limit of a task ("4:00:00"; "" for
  the partition's). gpus_per_task: 0 asks for no GPUs (a GPU request on a cluster without GPUs
  is refused). cpus_per_task: 0 for Slurm's default (one core). max_parallel: tasks running at
  once (0: no limit). signal_seconds: SIGUSR1 this long before the time limit. poll_seconds:
  `--wait`'s polling interval.
  """
  partition: str = ""
  time: str = ""
  gpus_per_task: int = 0
  cpus_per_task: int = 0
  max_parallel: int = 0
  signal_seconds: int = 90
  poll_seconds: float = 10.0


def log_path(slurm_dir: str, job_id: str, task: int) -> str:
  return os.path.join(slurm_dir, f"{job_id}_{task}.out")


def sbatch_args(options: Options, tasks: list[int], slurm_dir: str, *, chdir: str,
                job_name: str = "reinit-sweep") -> list[str]:
  """The sbatch options of an array of `tasks` (run indices); GPUs only when asked for."""
  array = ",".join(str(t) for t in tasks)
  if options.max_parallel > 0:
    array += f"%{options.max_parallel}"
  args = [f"--array={array}", f"--job-name={job_name}", f"--chdir={chdir}",
          f"--output={os.path.join(slurm_dir, '%A_%a.out')}", "--open-mode=append",
          "--requeue", f"--signal=USR1@{options.signal_seconds}", "--ntasks=1", "--parsable"]
  if options.partition:
    args.append(f"--partition={options.partition}")
  if options.time:
    args.append(f"--time={options.time}")
  if options.cpus_per_task > 0:
    args.append(f"--cpus-per-task={options.cpus_per_task}")
  if options.gpus_per_task > 0:
    args.append(f"--gpus-per-task={options.gpus_per_task}")
  return args


def job_script(commands: dict[int, list[str]], *, preempted_status: int) -> str:
  """The array's batch script: task i runs `commands[i]` as a job step.

  The run is an `srun` step so that `--signal=USR1@...` (sent to steps) reaches it; when it
  exits with `preempted_status` and the shell is still alive (SIGUSR1 went to the step only;
  `scancel` and `scontrol requeue` also end the shell), the task requeues itself.
  """
  cases = "\n".join(f"  {task}) command=({shlex.join(argv)}) ;;"
                    for task, argv in sorted(commands.items()))
  return f"""#!/usr/bin/env bash
# Written by `launch.sweep --scheduler=slurm`: array task i runs program i of the sweep.
set -u
case "$SLURM_ARRAY_TASK_ID" in
{cases}
  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;
esac
echo "[$(date -u +%FT%TZ)] task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID on \\
$(hostname -s), restart ${{SLURM_RESTART_COUNT:-0}}: ${{command[*]}}"
srun --ntasks=1 "${{command[@]}}"
status=$?
if [[ $status == {preempted_status} ]]; then
  echo "[$(date -u +%FT%TZ)] checkpointed before the time limit; requeueing"
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit $status
"""


def _run(argv: list[str]) -> str:
  try:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
  except FileNotFoundError as e:
    raise SlurmError(f"{argv[0]} not found: no Slurm client on this machine (for a local "
                     "cluster: launch/slurm/local_cluster.sh up)") from e
  if proc.returncode:
    message = " ".join((proc.stderr or proc.stdout).split())
    raise SlurmError(f"{shlex.join(argv[:2])} ... failed: {message}")
  return proc.stdout


def submit(script_path: str, args: list[str]) -> str:
  """`sbatch ARGS SCRIPT`; returns the job id."""
  return _run(["sbatch", *args, script_path]).strip().split(";")[0]


def task_states(job_id: str) -> dict[int, str]:
  """{array task: state} of a job; empty once Slurm forgot it (after MinJobAge)."""
  try:
    out = _run(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%i|%T"])
  except SlurmError as e:
    if "Invalid job id" in str(e):
      return {}
    raise
  states = {}
  for line in out.splitlines():
    task_id, _, state = line.strip().partition("|")
    _, _, task = task_id.partition("_")
    if task.isdigit():
      states[int(task)] = state
  return states


def read_submissions(slurm_dir: str) -> list[dict]:
  path = os.path.join(slurm_dir, SUBMISSIONS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# The layout of submissions recorded before layouts were: one run per task.
_OLD_LAYOUT = "runs_per_program=1"


def record_submission(slurm_dir: str, job_id: str, names: dict[int, str], layout: str) -> None:
  with open(os.path.join(slurm_dir, SUBMISSIONS_FILE), "a") as f:
    f.write(json.dumps({"job_id": job_id, "layout": layout,
                        "tasks": {str(t): n for t, n in names.items()},
                        "submitted": time.time()}) + "\n")


def active_tasks(slurm_dir: str, layout: str) -> dict[int, str]:
  """{task: job id} of the tasks a previous submission still has pending or running.

  Raises SlurmError if one of them belongs to a submission of another `layout` (its task ids
  name other runs: submitting now could train a run twice at once)."""
  active = {}
  for submission in read_submissions(slurm_dir):
    states = task_states(submission["job_id"])
    tasks = [t for t in map(int, submission["tasks"]) if states.get(t) in ACTIVE_STATES]
    theirs = submission.get("layout", _OLD_LAYOUT)
    if tasks and theirs != layout:
      raise SlurmError(f"job {submission['job_id']} still has tasks queued with {theirs}; "
                       f"accepted: the same {theirs.split('=')[0]}, or wait for it (or scancel "
                       "it) before submitting with " + layout)
    active.update({t: submission["job_id"] for t in tasks})
  return active


@dataclasses.dataclass
class Progress:
  """Counts of a set of tasks, and the failed ones as (task, state, log path)."""
  done: int = 0
  running: int = 0
  pending: int = 0
  failed: list = dataclasses.field(default_factory=list)

  @property
  def active(self) -> int:
    return self.running + self.pending


def progress_of(slurm_dir: str, tasks: dict[int, str], finished) -> Progress:
  """Progress of `tasks` ({run index: job id}) from `squeue`; `finished(task)` says whether the
  run's results exist (which counts, also for tasks Slurm has forgotten)."""
  out = Progress()
  states_of = {job: task_states(job) for job in set(tasks.values())}
  for task, job in sorted(tasks.items()):
    state = states_of[job].get(task, "UNKNOWN")
    if state == DONE_STATE or (state not in ACTIVE_STATES and finished(task)):
      out.done += 1
    elif state in RUNNING_STATES:
      out.running += 1
    elif state in ACTIVE_STATES:
      out.pending += 1
    else:
      out.failed.append((task, state, log_path(slurm_dir, job, task)))
  return out


def progress_line(p: Progress, total: int, elapsed_s: float) -> str:
  """`3/12 done, 2 running, 6 pending, 1 failed, ETA ~4 min` (ETA from the rate so far)."""
  line = (f"{p.done}/{total} done, {p.running} running, {p.pending} pending, "
          f"{len(p.failed)} failed")
  if p.done and p.active:
    line += f", ETA ~{_minutes(elapsed_s / p.done * p.active)}"
  return line + f" ({_minutes(elapsed_s)} elapsed)"


def _minutes(seconds: float) -> str:
  return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def wait(slurm_dir: str, tasks: dict[int, str], finished, *, since: float,
         poll_seconds: float, echo=print) -> Progress:
  """Polls until none of `tasks` ({run index: job id}) is pending or running; echoes progress
  when it changes, then the failed tasks with their logs. `since`: the submission time (epoch
  seconds) the ETA's rate counts from; `finished` as for `progress_of`."""
  last = None
  while True:
    p = progress_of(slurm_dir, tasks, finished)
    line = progress_line(p, len(tasks), time.time() - since)
    counts = (p.done, p.running, p.pending, len(p.failed))
    if counts != last:
      echo(f"slurm: {line}")
      last = counts
    if not p.active:
      break
    time.sleep(poll_seconds)
  for task, state, path in p.failed:
    echo(f"slurm: task {task} {state}: {path}")
  return p


def submit_runs(root: str, runs: list[tuple[str, list[str], bool]], options: Options, *,
                chdir: str, preempted_status: int, layout: str = _OLD_LAYOUT,
                echo=print) -> dict[int, str]:
  """Submits, as one array, the programs that are neither finished nor queued by an earlier
  submission.

  Args:
    root: the sweep's workdir; scripts, logs and the submission record go to `root/slurm`.
    runs: (name, argv, finished) of every program of the sweep, in order (task i = entry i).
    options: what to ask Slurm for.
    chdir: the directory the tasks run in (where `python -m launch...` imports this code).
    preempted_status: the exit status of a program stopped by a preemption notice.
    layout: what a task id means (e.g. "runs_per_program=0"); tasks queued under another
      layout make this a SlurmError.
    echo: where the lines for the user go.

  Returns:
    {task: job id} of every task now queued, by this submission or an earlier one.
  """
  slurm_dir = os.path.join(root, "slurm")
  os.makedirs(slurm_dir, exist_ok=True)
  queued = active_tasks(slurm_dir, layout)
  for task, job in sorted(queued.items()):
    echo(f"{runs[task][0]}: already queued as task {task} of job {job}; not submitted again")
  todo = {i: argv for i, (_, argv, finished) in enumerate(runs)
          if not finished and i not in queued}
  if not todo:
    echo(f"slurm: nothing to submit ({sum(f for _, _, f in runs)}/{len(runs)} programs "
         f"finished, {len(queued)} queued)")
    return queued
  script = os.path.join(slurm_dir, f"array-{len(read_submissions(slurm_dir))}.sh")
  with open(script, "w") as f:
    f.write(job_script(todo, preempted_status=preempted_status))
  os.chmod(script, 0o755)
  try:
    job = submit(script, sbatch_args(options, sorted(todo), slurm_dir, chdir=chdir))
  except SlurmError:
    os.remove(script)  # refused (e.g. GPUs where there are none): leave no trace of it
    raise
  record_submission(slurm_dir, job, {i: runs[i][0] for i in todo}, layout)
  echo(f"slurm: submitted {len(todo)} of {len(runs)} programs as job array {job} (tasks "
       f"{','.join(map(str, sorted(todo)))}); logs: {log_path(slurm_dir, job, 0)[:-5]}TASK.out")
  return queued | {i: job for i in todo}


def submitted_since(slurm_dir: str, jobs) -> float:
  """The earliest submission time (epoch seconds) of `jobs`."""
  times = [s["submitted"] for s in read_submissions(slurm_dir) if s["job_id"] in set(jobs)]
  return min(times, default=time.time())
