r"""A sweep: every run of a config's `get_sweep(arg)`, one after another, then a summary table.

  python -m launch.sweep --config=configs/digits.py --workdir=runs/digits
  python -m launch.sweep --config=configs/digits.py --workdir=runs/digits --dry_run

A config file with a sweep defines `get_sweep(arg) -> list[dict]`; each dict is one run: its keys
`dataset`, `model`, `method` go into the config argument (so dataset defaults follow them), the
others override fields (`seed`, `lw.rescale`, ...). `--config.FIELD=VALUE` overrides apply to
every run. Each run goes to `WORKDIR/<name>`; a run whose `results.json` exists is skipped, so
a stopped sweep continues where it stopped. Runs that differ only in `seed` train as one program
(`--runs_per_program`, default all seeds of a combination; 1 = one `launch.main` per run).
`--dry_run` prints the programs' commands instead (for a cluster): a program of several seeds
is `launch.sweep ... --task_index=I --num_tasks=N`, program I of the sweep.

  python -m launch.sweep --config=configs/digits.py --workdir=runs/digits --scheduler=slurm \
    [--slurm.partition=P --slurm.time=4:00:00 --slurm.gpus_per_task=1 --slurm.max_parallel=8] \
    [--wait]
  python -m launch.sweep --config=configs/paper.py:study=full --workdir=gs://B/runs \
    --task_index=I --num_tasks=N

`--scheduler=slurm` submits the unfinished programs (not finished, not queued earlier) as one
requeueable Slurm job array, task I = program I, and prints its job id; `--wait` follows it to
the end (`launch/slurm/array.py`). `--task_index/--num_tasks` run one share of the sweep's
programs (every N-th from program I on), e.g. one per host of a TPU pod
(`launch/tpu_pod.sh sweep`).
"""

import contextlib
import dataclasses
import importlib.util
import json
import os
import shlex
import sys

from absl import app
from absl import flags
from etils import epath
import ml_collections
from ml_collections import config_flags

from launch import common
from launch.slurm import array as slurm_array

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config: FILE.py[:ARG].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory; each run gets a subfolder.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands of the runs, run nothing.")
_SCHEDULER = flags.DEFINE_enum(
    "scheduler", "local", ["local", "slurm"],
    "local: run here, one after another; slurm: submit the unfinished runs as one job array.")
_SLURM = config_flags.DEFINE_config_dict(
    "slurm", ml_collections.ConfigDict(dataclasses.asdict(slurm_array.Options())),
    "With --scheduler=slurm: --slurm.partition, .time, .gpus_per_task, .cpus_per_task, "
    ".max_parallel, .signal_seconds, .poll_seconds (launch/slurm/array.py).")
_WAIT = flags.DEFINE_bool("wait", False, "With --scheduler=slurm: follow the array until it "
                          "is done, printing progress; exit 1 if a run failed.")
_TASK_INDEX = flags.DEFINE_integer("task_index", 0, "Run only the programs i with i % "
                                   "num_tasks == task_index (one host's share of a sweep; a "
                                   "program is a group of seeds, or one run with "
                                   "--runs_per_program=1).")
_NUM_TASKS = flags.DEFINE_integer("num_tasks", 1, "How many tasks share the sweep.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: call jax.distributed.initialize() first; every process "
    "then runs the same sweep, each program (a group, or one run) over all processes' devices "
    "(a group's runs spread over them: reinit.group_train). Local scheduler only.")
_RUNS_PER_PROGRAM = flags.DEFINE_integer(
    "runs_per_program", 0, "Runs that differ only in `seed` train as one program "
    "(reinit.group_train), at most R of them; 0 (default): all seeds of a combination; 1: one "
    "run per program (`launch.main`). Holds for local sweeps, tasks, --dry_run and Slurm arrays.")
flags.mark_flags_as_required(["config", "workdir"])

_ARG_KEYS = ("dataset", "model", "method")


def load_module(path: str):
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _split_config_flag(value: str) -> tuple[str, str | None]:
  path, sep, arg = value.partition(":")
  return path, (arg if sep else None)


def run_name(run: dict) -> str:
  """{'method': 'lw', 'seed': 0} -> 'method=lw,seed=0' (a folder name)."""
  return ",".join(f"{k}={v}" for k, v in run.items()).replace("/", "-") or "default"


def _merged_arg(arg: str | None, run: dict) -> str:
  items = dict(item.split("=", 1) for item in filter(None, (arg or "").split(",")))
  items.update({k: str(v) for k, v in run.items() if k in _ARG_KEYS})
  return ",".join(f"{k}={v}" for k, v in items.items())


def runs_of(config_path: str, arg: str | None, cli_overrides: dict) -> list[tuple[str, object]]:
  """(name, run, config) of every run of the sweep, with the command-line overrides applied."""
  module = load_module(config_path)
  if not hasattr(module, "get_sweep"):
    common.fail(f"config {config_path} defines no get_sweep(arg); accepted: a config file with "
                "a sweep, e.g. configs/digits.py")
  out = []
  for run in module.get_sweep(arg):
    config = module.get_config(_merged_arg(arg, run))
    config.update_from_flattened_dict({k: v for k, v in run.items() if k not in _ARG_KEYS})
    config.update_from_flattened_dict(cli_overrides)
    out.append((run_name(run), run, config))
  return out


def main_argv(config_path, arg, run, cli_overrides, workdir, python="python") -> list[str]:
  """The `launch.main` command line of one run."""
  parts = [python, "-m", "launch.main",
           f"--config={config_path}:{_merged_arg(arg, run)}", f"--workdir={workdir}"]
  parts += [f"--config.{k}={v}" for k, v in run.items() if k not in _ARG_KEYS]
  parts += [f"--config.{k}={v}" for k, v in cli_overrides.items()]
  return parts


def task_argv(config_path, arg, cli_overrides, root, task_index: int, num_tasks: int,
              runs_per_program: int, python="python") -> list[str]:
  """The `launch.sweep` command line that trains program `task_index` of `num_tasks` (one group
  of seeds; `program_groups`), skipping its finished runs."""
  parts = [python, "-m", "launch.sweep",
           f"--config={config_path}" + ("" if arg is None else f":{arg}"), f"--workdir={root}",
           f"--task_index={task_index}", f"--num_tasks={num_tasks}",
           f"--runs_per_program={runs_per_program}"]
  return parts + [f"--config.{k}={v}" for k, v in cli_overrides.items()]


@dataclasses.dataclass(frozen=True)
class Program:
  """One program of a sweep: the runs it trains (indices into `runs_of`) and its command."""
  name: str
  runs: tuple[int, ...]
  argv: list[str]


def programs_of(config_path, arg, cli_overrides, root, runs: list, runs_per_program: int,
                python="python") -> list[Program]:
  """The programs that train `runs` (`runs_of`): one `launch.main` per run when
  `runs_per_program` is 1, else one `launch.sweep` task per group of seeds (`program_groups`),
  numbered over the whole sweep, so that program i names the same runs in every call."""
  if runs_per_program == 1:
    return [Program(name, (i,), main_argv(config_path, arg, run, cli_overrides,
                                          os.path.join(root, name), python=python))
            for i, (name, run, _) in enumerate(runs)]
  groups = program_groups([config for _, _, config in runs], runs_per_program)
  return [Program(", ".join(runs[i][0] for i in group), tuple(group),
                  task_argv(config_path, arg, cli_overrides, root, g, len(groups),
                            runs_per_program, python=python))
          for g, group in enumerate(groups)]


def shard(items: list, task_index: int, num_tasks: int) -> list:
  """Task `task_index`'s share of `items`: every `num_tasks`-th, from `task_index` on.

  Sharded over the whole sweep, not over its unfinished runs: hosts that look at different
  times see different unfinished runs, but always the same sweep.
  """
  return items[task_index::num_tasks]


def summary_table(rows: list[dict]) -> str:
  """A markdown table of finished runs: name, test and train accuracy, epochs, wall time."""
  lines = ["| run | test accuracy | train accuracy | epochs | wall time (s) |",
           "|---|---|---|---|---|"]
  for name, r in rows:
    lines.append(f"| {name} | {r['test_accuracy']:.4f} | {r['train_accuracy']:.4f} | "
                 f"{r['total_epochs']} | {r['wall_time_s']:.0f} |")
  return "\n".join(lines)


def program_groups(configs: list, runs_per_program: int = 0) -> list[list[int]]:
  """Indices of the runs trained together: runs whose configs differ only in `seed`, in the
  order they first appear, cut into groups of at most `runs_per_program` (0: no cap).

  Raises ValueError (one line) for a negative `runs_per_program`."""
  if runs_per_program < 0:
    raise ValueError(f"runs_per_program={runs_per_program} is invalid; accepted: 0 (all seeds of "
                     "a combination) or a positive integer")
  from reinit import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  by_combination: dict[str, list[int]] = {}
  for i, config in enumerate(configs):
    by_combination.setdefault(workdir_lib.combination_key(config), []).append(i)
  cap = runs_per_program or len(configs) or 1
  return [members[j:j + cap] for members in by_combination.values()
          for j in range(0, len(members), cap)]


def _group_or_exit(configs: list, workdirs: list[str], next_group: tuple | None = None
                   ) -> list[dict]:
  """`group_train.train_group` of runs differing only in seed (warming up `next_group`, the
  (config, seeds) trained next, if any); errors as `run_or_exit`."""
  from reinit import group_train  # pylint: disable=g-import-not-at-top
  from reinit import train  # pylint: disable=g-import-not-at-top
  try:
    return group_train.train_group(configs[0], [c.seed for c in configs], workdirs,
                                   next_group=next_group)
  except train.ConfigError as e:
    common.fail(str(e))
  except train.TrainingDiverged as e:
    common.fail(str(e), status=3)
  except train.Preempted as e:
    common.fail(str(e), status=common.PREEMPTED)


def run_sweep(config_path: str, arg: str | None, cli_overrides: dict, root: str, *,
              dry_run: bool = False, task_index: int = 0, num_tasks: int = 1,
              runs_per_program: int = 0) -> list[tuple[str, dict, dict]]:
  """Runs every run of the sweep, one program after another (`runs_per_program`: 1, one run a
  program; else groups of seeds, `program_groups`); with `num_tasks` > 1, only task
  `task_index`'s share of the programs (`shard`). With `dry_run`, prints the programs'
  commands (`programs_of`) instead and returns nothing.

  Returns (name, run, results) of every finished run, those finished earlier included.
  """
  finished = []
  runs = runs_of(config_path, arg, cli_overrides)
  if dry_run:
    for program in shard(programs_of(config_path, arg, cli_overrides, root, runs,
                                     runs_per_program), task_index, num_tasks):
      print(shlex.join(program.argv))
    return []
  if runs_per_program != 1:
    # Tasks share groups, not runs: a combination's seeds stay in one program.
    groups = shard(program_groups([config for _, _, config in runs], runs_per_program),
                   task_index, num_tasks)
    return _run_grouped([[runs[i] for i in group] for group in groups], root)
  runs = shard(runs, task_index, num_tasks)
  progress = common.Progress(len(runs))
  for name, run, config in runs:
    earlier = _finished_earlier(root, name, progress)
    if earlier is not None:
      finished.append((name, run, earlier))
      continue
    print(f"{name}: running ...", flush=True)
    results = common.run_or_exit(config, str(epath.Path(root) / name))
    _print_finished(name, results, progress)
    finished.append((name, run, results))
  return finished


def _next_unfinished(later: list[list], root: str) -> tuple | None:
  """(config, seeds) of the unfinished runs of the first of the `later` groups that has some,
  else None: what `train_group` warms up while the group before it trains."""
  for group in later:
    configs = [config for name, _, config in group if not _is_finished(root, name)]
    if configs:
      return configs[0], [c.seed for c in configs]
  return None


def _is_finished(root: str, name: str) -> bool:
  """Whether run `name` has its results (and is a run of ours: without its config.json a
  results.json is not one, and launch.main refuses it)."""
  from reinit import train  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(root) / name
  return (workdir / train.RESULTS_FILE).exists() and (workdir / train.CONFIG_FILE).exists()


def _finished_earlier(root: str, name: str, progress: common.Progress) -> dict | None:
  """The results of run `name` if an earlier call finished it (said, and counted in
  `progress`), else None."""
  from reinit import train  # pylint: disable=g-import-not-at-top
  if not _is_finished(root, name):
    return None
  print(f"{name}: finished earlier, skipped [{progress.step()}]", flush=True)
  return json.loads((epath.Path(root) / name / train.RESULTS_FILE).read_text())


def _print_finished(name: str, results: dict, progress: common.Progress) -> None:
  print(f"{name}: test accuracy {results['test_accuracy']:.4f} "
        f"({results['wall_time_s']:.0f} s) [{progress.step(results['wall_time_s'])}]",
        flush=True)


def _run_grouped(groups: list[list], root: str) -> list:
  """`run_sweep` of runs trained as groups: each group's unfinished runs as one program
  (`group_train.train_group`, also when one is left: a run's data order, augmentation and
  draws do not depend on which other seeds share its program; its numbers only to float
  rounding)."""
  finished = []
  progress = common.Progress(sum(len(group) for group in groups))
  for g, group in enumerate(groups):
    todo = []
    for name, run, config in group:
      earlier = _finished_earlier(root, name, progress)
      if earlier is not None:
        finished.append((name, run, earlier))
      else:
        todo.append((name, run, config))
    if not todo:
      continue
    names = [name for name, _, _ in todo]
    print(f"{', '.join(names)}: running as one program ...", flush=True)
    all_results = _group_or_exit([config for _, _, config in todo],
                                 [str(epath.Path(root) / name) for name in names],
                                 _next_unfinished(groups[g + 1:], root))
    for (name, run, _), results in zip(todo, all_results):
      _print_finished(name, results, progress)
      finished.append((name, run, results))
  return finished


def slurm_sweep(config_path: str, arg: str | None, cli_overrides: dict, root: str,
                options: slurm_array.Options, *, wait: bool, runs_per_program: int = 0):
  """Submits the sweep's unfinished programs (`programs_of`: groups of seeds, or one run each
  with `runs_per_program=1`) as a Slurm job array, task i = program i; with `wait`, follows it.

  Returns (finished, failed): (name, run, results) of every finished run, and the failed
  tasks as (task, state, log path) (empty without `wait`).
  """
  from reinit import train  # pylint: disable=g-import-not-at-top
  # A local (shared) directory: Slurm writes the job scripts and logs there.
  root = os.path.abspath(root)
  runs = runs_of(config_path, arg, cli_overrides)

  def results_path(i):
    return epath.Path(root) / runs[i][0] / train.RESULTS_FILE

  programs = programs_of(os.path.abspath(config_path), arg, cli_overrides, root, runs,
                         runs_per_program, python=sys.executable)

  def program_finished(task):
    return all(results_path(i).exists() for i in programs[task].runs)

  entries = [(p.name, p.argv, program_finished(task)) for task, p in enumerate(programs)]
  failed = []
  try:
    tracked = slurm_array.submit_runs(
        root, entries, options, chdir=_CODE_ROOT, preempted_status=common.PREEMPTED,
        layout=f"runs_per_program={runs_per_program}",
        echo=lambda line: print(line, flush=True))
    if wait and tracked:
      slurm_dir = os.path.join(root, "slurm")
      failed = slurm_array.wait(
          slurm_dir, tracked, program_finished,
          since=slurm_array.submitted_since(slurm_dir, tracked.values()),
          poll_seconds=options.poll_seconds, echo=lambda line: print(line, flush=True)).failed
  except slurm_array.SlurmError as e:
    common.fail(str(e), status=1)
  finished = []
  for i, (name, run, _) in enumerate(runs):
    if results_path(i).exists():
      finished.append((name, run, json.loads(results_path(i).read_text())))
  return finished, failed


# Where `python -m launch.main` imports this code from: the array tasks run there.
_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slurm_options() -> slurm_array.Options:
  """The --slurm.* flags."""
  return slurm_array.Options(**_SLURM.value.to_dict())


def config_flag_parts() -> tuple[str, str | None, dict]:
  """(config file, its argument, the --config.FIELD overrides) of the --config flag."""
  path, arg = _split_config_flag(config_flags.get_config_filename(flags.FLAGS["config"]))
  return path, arg, config_flags.get_override_values(flags.FLAGS["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config_path, arg, cli_overrides = config_flag_parts()
  check_sharding(_TASK_INDEX.value, _NUM_TASKS.value)
  check_runs_per_program(_RUNS_PER_PROGRAM.value)
  if _DISTRIBUTED.value:
    if _SCHEDULER.value != "local" or _DRY_RUN.value or _NUM_TASKS.value != 1:
      common.fail(f"distributed is for running every program here, over all processes; "
                  f"accepted: --scheduler=local, no --dry_run, --num_tasks=1 (got "
                  f"--scheduler={_SCHEDULER.value}{' --dry_run' if _DRY_RUN.value else ''} "
                  f"--num_tasks={_NUM_TASKS.value})")
    common.initialize_distributed()
  if _SCHEDULER.value == "slurm" and not _DRY_RUN.value:
    finished, failed = slurm_sweep(config_path, arg, cli_overrides, _WORKDIR.value,
                                   slurm_options(), wait=_WAIT.value,
                                   runs_per_program=_RUNS_PER_PROGRAM.value)
    if _WAIT.value:
      _print_summary(finished)
    if failed:
      common.fail(f"{len(failed)} programs failed; their logs: "
                  f"{', '.join(path for _, _, path in failed)}", status=1)
    return
  with _printed_by_first_process_only():
    _print_summary(run_sweep(config_path, arg, cli_overrides, _WORKDIR.value,
                             dry_run=_DRY_RUN.value, task_index=_TASK_INDEX.value,
                             num_tasks=_NUM_TASKS.value,
                             runs_per_program=_RUNS_PER_PROGRAM.value))


def _print_summary(finished: list) -> None:
  """The table of the finished runs (none: nothing printed)."""
  if finished:
    print(summary_table([(name, results) for name, _, results in finished]))


@contextlib.contextmanager
def _printed_by_first_process_only():
  """Standard output dropped on processes other than the first of a multi-process sweep (JAX's
  distributed runtime initialized: `--distributed`, or a driver that initialized it): every
  process runs every program, and their progress lines and tables would repeat the first's
  once per process. Errors and logs (standard error) stay. Starts no JAX backend."""
  jax = sys.modules.get("jax")
  if jax is not None and jax.distributed.is_initialized() and jax.process_index() != 0:
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
      yield
    return
  yield


def check_runs_per_program(value: int) -> None:
  """Exits with one line on a negative --runs_per_program."""
  try:
    program_groups([], value)
  except ValueError as e:
    common.fail(str(e))


def check_sharding(task_index: int, num_tasks: int) -> None:
  if num_tasks < 1:
    common.fail(f"num_tasks={num_tasks} is invalid; accepted: a positive integer")
  if not 0 <= task_index < num_tasks:
    common.fail(f"task_index={task_index} is invalid; accepted: 0..{num_tasks - 1}")


if __name__ == "__main__":
  sys.exit(common.run_app(main))
