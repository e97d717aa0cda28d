r"""Results -> the paper's tables and figures: `python -m launch.report DIR [--out OUT]`.

Reads every `results.json` under DIR (recursively; one per run, see README.md "What a run writes")
and every `analysis.json` next to one (written by `launch.analyze`), and writes into OUT
(default DIR/report); DIR and OUT may be `gs://...` (etils.epath):

  runs.csv                 one row per run (accuracies as fractions in [0, 1])
  table2.md, table2.csv    Table 2: rows (dataset, model, train_examples), columns methods; test
                           accuracy mean ± standard error over seeds (std(ddof=1)/sqrt(n); no ±
                           for one seed), in % in the markdown with the best mean of a row in
                           bold; the CSV holds fractions: `<method>_mean`, `_sem`, `_n`.
  table3.md, table3.csv    Table 3: each method against `baseline` (and against `baseline_long`
                           when present): over the (dataset, model, train_examples) rows where both
                           exist, wins/losses/ties of the seed-mean accuracy, the exact two-sided
                           binomial (sign) test of wins vs losses (ties dropped) and its Holm
                           correction over the methods compared with one reference.
  analysis.md, .csv        the analyses per (dataset, model, train_examples, method), means over
                           seeds: margins, norms (BN-folded, then raw), flatness, Hessian
                           (BN-folded, then raw), memorization; a legend says which measure is
                           invariant to what.
  gain_vs_size.png         accuracy gain over baseline vs training-set size (log x), per method,
                           averaged over datasets and models.
  per_dataset.png          test accuracy per dataset and method, sem error bars; one panel per
                           (model, train_examples).
  compute_vs_accuracy.png  test accuracy vs training compute (train FLOPs when every run reports
                           them, else total epochs), per method.

A combination is (dataset, model, train_examples), plus `label_noise` when the runs differ in
it (a column of the tables then); the figures use the runs without label noise when there are
any. Runs pooled as seeds that differ in other config fields raise a warning.

Prints Table 2 and Table 3 (markdown) and the written paths. `build_report(DIR, OUT)` does the
same from Python and returns the tables. Needs pandas, scipy and matplotlib (Agg, no display); the
tables and figures themselves are in `reinit/report/`.
"""

import argparse
import sys
from typing import Sequence

from etils import epath

from reinit import report

_FIGURES = {"gain_vs_size.png": report.plot_gain_vs_size,
            "per_dataset.png": report.plot_per_dataset,
            "compute_vs_accuracy.png": report.plot_compute_vs_accuracy}


def _write_text(path: epath.Path, text: str) -> str:
  path.write_text(text + "\n")
  return str(path)


def _write_csv(path: epath.Path, table) -> str:
  with path.open("w") as f:
    table.to_csv(f, index=False)
  return str(path)


def _write_tables(runs, out: epath.Path, files: dict) -> dict:
  """Tables 2 and 3 (CSV and markdown with the provenance footer) into `out`; their markdown."""
  t2, t3 = report.table2(runs), report.table3(runs)
  footer = "\n\n" + report.provenance_footer(runs)
  markdown = {"table2": report.table2_markdown(t2) + footer,
              "table3": report.table3_markdown(t3) + footer, "analysis": None}
  for name, table in (("table2", t2), ("table3", t3)):
    files[f"{name}.csv"] = _write_csv(out / f"{name}.csv", table)
    files[f"{name}.md"] = _write_text(out / f"{name}.md", markdown[name])
  return {"table2": t2, "table3": t3, "markdown": markdown}


def _write_analysis(results_dir, out: epath.Path, files: dict):
  """The analysis table (CSV and markdown) into `out`; (table, markdown), or (None, None)
  without any analysis.json."""
  analyses = report.load_analyses(results_dir)
  if analyses.empty:
    return None, None
  table = report.analysis_table(analyses)
  markdown = report.analysis_markdown(table)
  files["analysis.csv"] = _write_csv(out / "analysis.csv", table)
  files["analysis.md"] = _write_text(out / "analysis.md", markdown)
  return table, markdown


def _write_figures(runs, out: epath.Path, files: dict) -> None:
  # The figures show the benchmark: the runs without label noise, when there are any.
  clean = runs[runs["label_noise"] == 0] if (runs["label_noise"] == 0).any() else runs
  for name, plot in _FIGURES.items():
    written = plot(clean, out / name)
    if written:
      files[name] = written


def build_report(results_dir: epath.PathLike, out_dir: epath.PathLike | None = None) -> dict:
  """Reads `results_dir`, writes the report into `out_dir` (default results_dir/report).

  Returns a dict: runs, table2, table3, analysis (DataFrames; analysis None without any
  analysis.json), markdown ({'table2', 'table3', 'analysis'} strings) and files (name -> path
  of every file written; a figure that could not be drawn is absent).

  Raises:
    ValueError: no results.json under `results_dir` (one line).
  """
  out = epath.Path(out_dir) if out_dir else epath.Path(results_dir) / "report"
  runs = report.load_runs(results_dir)
  if runs.empty:
    raise ValueError(f"no readable {report.RESULTS_FILE} under {str(results_dir)!r}")
  out.mkdir(parents=True, exist_ok=True)
  files = {"runs.csv": _write_csv(out / "runs.csv", runs.drop(columns=["config", "provenance"]))}
  built = {"runs": runs, **_write_tables(runs, out, files)}
  built["analysis"], built["markdown"]["analysis"] = _write_analysis(results_dir, out, files)
  _write_figures(runs, out, files)
  return {**built, "files": files}


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one line, `error: ...`, exit status 2."""

  def error(self, message):
    print(f"error: {message}; usage: python -m launch.report DIR [--out OUT]", file=sys.stderr)
    sys.exit(2)


def _print_report(built: dict) -> None:
  print("## Table 2\n\n" + built["markdown"]["table2"] + "\n")
  print("## Table 3\n\n" + built["markdown"]["table3"] + "\n")
  if built["markdown"]["analysis"]:
    print("## Analyses\n\n" + built["markdown"]["analysis"] + "\n")
  for name, path in built["files"].items():
    if name.endswith(".png"):
      print(f"figure: {path}")
  print(f"report: {epath.Path(built['files']['runs.csv']).parent}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = _Parser(prog="python -m launch.report", description=__doc__.splitlines()[0])
  parser.add_argument("results_dir", metavar="DIR", help="directory of runs (searched recursively)")
  parser.add_argument("--out", default=None, help="output directory (default DIR/report)")
  args = parser.parse_args(argv)
  if not epath.Path(args.results_dir).is_dir():
    parser.error(f"DIR={args.results_dir!r} is not a directory; accepted: a directory holding "
                 f"{report.RESULTS_FILE} files")
  try:
    built = build_report(args.results_dir, args.out)
  except ValueError as e:
    print(f"error: DIR={args.results_dir!r}: {e}; accepted: a directory holding "
          f"{report.RESULTS_FILE} files", file=sys.stderr)
    return 2
  _print_report(built)
  return 0


if __name__ == "__main__":
  sys.exit(main())
