r"""A sweep: every run of a config's `get_sweep(arg)`, one after another, then a summary table.

  python -m launch.sweep --config=configs/digits.py --workdir=runs/digits
  python -m launch.sweep --config=configs/digits.py --workdir=runs/digits --dry_run

A config file with a sweep defines `get_sweep(arg) -> list[dict]`; each dict is one run: its keys
`dataset`, `model`, `method` go into the config argument (so dataset defaults follow them), the
others override fields (`seed`, `lw.rescale`, ...). `--config.FIELD=VALUE` overrides apply to
every run. Each run goes to `WORKDIR/<name>`; a run whose `results.json` exists is skipped, so
a stopped sweep continues where it stopped. `--dry_run` prints the `launch.main` commands instead
(for a cluster); runs in-process share compiled steps, which makes local sweeps faster.
"""

import importlib.util
import json
import os
import shlex
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config: FILE.py[:ARG].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory; each run gets a subfolder.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands of the runs, run nothing.")
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


def _command(config_path, arg, run, cli_overrides, workdir) -> str:
  parts = ["python", "-m", "launch.main",
           f"--config={config_path}:{_merged_arg(arg, run)}", f"--workdir={workdir}"]
  parts += [f"--config.{k}={v}" for k, v in run.items() if k not in _ARG_KEYS]
  parts += [f"--config.{k}={v}" for k, v in cli_overrides.items()]
  return shlex.join(parts)


def summary_table(rows: list[dict]) -> str:
  """A markdown table of finished runs: name, test and train accuracy, epochs, wall time."""
  lines = ["| run | test accuracy | train accuracy | epochs | wall time (s) |",
           "|---|---|---|---|---|"]
  for name, r in rows:
    lines.append(f"| {name} | {r['test_accuracy']:.4f} | {r['train_accuracy']:.4f} | "
                 f"{r['total_epochs']} | {r['wall_time_s']:.0f} |")
  return "\n".join(lines)


def run_sweep(config_path: str, arg: str | None, cli_overrides: dict, root: str, *,
              dry_run: bool = False) -> list[tuple[str, dict, dict]]:
  """Runs (or with `dry_run` prints the command of) every run of the sweep, one by one.

  Returns (name, run, results) of every finished run, those finished earlier included.
  """
  from reinit import train  # pylint: disable=g-import-not-at-top
  finished = []
  runs = runs_of(config_path, arg, cli_overrides)
  progress = common.Progress(len(runs))
  for name, run, config in runs:
    workdir = os.path.join(root, name)
    if dry_run:
      print(_command(config_path, arg, run, cli_overrides, workdir))
      continue
    results_path = os.path.join(workdir, train.RESULTS_FILE)
    # Without its config.json a results.json is not a run of ours: launch.main refuses it.
    if os.path.exists(results_path) and os.path.exists(os.path.join(workdir, train.CONFIG_FILE)):
      print(f"{name}: finished earlier, skipped [{progress.step()}]", flush=True)
      with open(results_path) as f:
        finished.append((name, run, json.load(f)))
      continue
    print(f"{name}: running ...", flush=True)
    results = common.run_or_exit(config, workdir)
    print(f"{name}: test accuracy {results['test_accuracy']:.4f} "
          f"({results['wall_time_s']:.0f} s) [{progress.step(results['wall_time_s'])}]",
          flush=True)
    finished.append((name, run, results))
  return finished


def config_flag_parts() -> tuple[str, str | None, dict]:
  """(config file, its argument, the --config.FIELD overrides) of the --config flag."""
  path, arg = _split_config_flag(config_flags.get_config_filename(flags.FLAGS["config"]))
  return path, arg, config_flags.get_override_values(flags.FLAGS["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config_path, arg, cli_overrides = config_flag_parts()
  finished = run_sweep(config_path, arg, cli_overrides, _WORKDIR.value, dry_run=_DRY_RUN.value)
  if finished:
    print(summary_table([(name, results) for name, _, results in finished]))


if __name__ == "__main__":
  sys.exit(common.run_app(main))
