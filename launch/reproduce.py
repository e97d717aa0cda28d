r"""Reproduce the study: run a sweep locally, analyze chosen runs, write the report.

  python -m launch.reproduce configs/paper.py:study=digits --workdir=runs/digits
  python -m launch.reproduce --config=configs/paper.py:study=full --workdir=DIR --dry_run

The SWEEP argument (or `--config`) is a config file with `get_sweep(arg)`, as for
`launch.sweep`; `--config.FIELD=VALUE` overrides apply to every run. Runs go one by one into
`WORKDIR/<run name>`; finished ones are skipped, so a stopped reproduction continues where it
stopped (and an interrupted run resumes from its checkpoint). With `--scheduler=slurm` (and the
`--slurm.*` options of `launch.sweep`) the unfinished runs go to Slurm as one job array and
the reproduction waits for it, printing progress; the analyses and the report then run here.
Then the runs the config file's `analyzed_runs(arg)` names get `analysis.json` (margins and
norms, flatness, Hessian; skipped when present), and `launch.report` writes Tables 2 and 3 and
the figures to WORKDIR/report and prints the tables. `--dry_run` prints the run commands (for a
cluster) and nothing else; build the report from their results with
`python -m launch.report WORKDIR`.
"""

import sys
import time

from absl import app
from absl import flags
from etils import epath

from launch import common
from launch import sweep  # also defines the --config, --workdir and --dry_run flags used here

_ANALYZE = flags.DEFINE_bool("analyze", True, "Analyze the runs the config file names.")


def _analyze(root: str, finished, wanted: list[dict]) -> None:
  from reinit import train  # pylint: disable=g-import-not-at-top
  from reinit import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from launch import analysis_run  # pylint: disable=g-import-not-at-top
  defaults = dict(analysis_run.DEFAULTS, analyses=analysis_run.ANALYSES)
  chosen = [name for name, run, _ in finished
            if any(all(run.get(k) == v for k, v in w.items()) for w in wanted)]
  progress = common.Progress(len(chosen), "analysis", "analyses")
  for name in chosen:
    workdir = epath.Path(root) / name
    if (workdir / workdir_lib.ANALYSIS_FILE).exists():
      print(f"{name}: analyzed earlier, skipped [{progress.step()}]", flush=True)
      continue
    print(f"{name}: analyzing ...", flush=True)
    start = time.perf_counter()
    try:
      result, _ = analysis_run.analyze_workdir(str(workdir), **defaults)
    except train.ConfigError as e:
      common.fail(str(e))
    print(analysis_run.summary(result), flush=True)
    print(f"{name}: analyzed [{progress.step(time.perf_counter() - start)}]", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config_path, arg, cli_overrides = sweep.config_flag_parts()
  sweep.check_runs_per_program(flags.FLAGS.runs_per_program)
  if flags.FLAGS.distributed:  # a flag of launch.sweep's, defined by importing it
    common.fail("distributed is not supported by launch.reproduce (its analyses and report run "
                "in one process); accepted: python -m launch.sweep --distributed ..., then "
                "python -m launch.reproduce ... on one host (finished runs are skipped)")
  root = flags.FLAGS.workdir
  if flags.FLAGS.scheduler == "slurm" and not flags.FLAGS.dry_run:
    finished, failed = sweep.slurm_sweep(config_path, arg, cli_overrides, root,
                                         sweep.slurm_options(), wait=True,
                                         runs_per_program=flags.FLAGS.runs_per_program)
    if failed:
      common.fail(f"{len(failed)} programs failed, no report; their logs: "
                  f"{', '.join(path for _, _, path in failed)}; run the same command again to "
                  "resubmit them", status=1)
  else:
    finished = sweep.run_sweep(config_path, arg, cli_overrides, root,
                               dry_run=flags.FLAGS.dry_run,
                               runs_per_program=flags.FLAGS.runs_per_program)
  if flags.FLAGS.dry_run:
    return
  module = sweep.load_module(config_path)
  if _ANALYZE.value and hasattr(module, "analyzed_runs"):
    _analyze(root, finished, module.analyzed_runs(arg))
  from launch import report  # pylint: disable=g-import-not-at-top
  out = report.build_report(root)
  for name in ("table2", "table3", "analysis"):
    if out["markdown"].get(name):
      print(f"\n{out['markdown'][name]}")
  figures = sorted(path for path in out["files"].values() if path.endswith(".png"))
  print(f"\nreport: {epath.Path(out['files']['runs.csv']).parent}; figures: {', '.join(figures)}")


def _positional_sweep_as_config(argv: list[str]) -> list[str]:
  """`reproduce SWEEP ...` is `reproduce --config=SWEEP ...`."""
  if len(argv) > 1 and not argv[1].startswith("-"):
    return [argv[0], f"--config={argv[1]}", *argv[2:]]
  return argv


if __name__ == "__main__":
  sys.argv = _positional_sweep_as_config(sys.argv)
  sys.exit(common.run_app(main))
