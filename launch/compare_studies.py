r"""Do two trees of runs agree within noise? `python -m launch.compare_studies DIR OTHER`.

For every (dataset, model, train_examples, method) present in both (read as `launch.report`
reads them), the mean test accuracy over seeds of DIR against OTHER's:
|Δ| <= 2 x the combined standard error + 0.5 points (`reinit.report.stats.within_noise`).
Made for the grouped trainer's check (issue 14): the digits study grouped (the default) and with
`--runs_per_program=1` must agree within noise, method by method:

  python -m launch.reproduce configs/paper.py:study=digits --workdir=runs/grouped
  python -m launch.reproduce configs/paper.py:study=digits --workdir=runs/single \
    --runs_per_program=1
  python -m launch.compare_studies runs/grouped runs/single

Prints a markdown table (accuracies in %); exits 1 when a row disagrees, 2 when nothing pairs up.
"""

import argparse
import sys

from launch import common


def compare(root: str, other: str) -> list[dict]:
  """Rows of the comparison: the combination keys, method, seeds on each side, `within_noise`."""
  from reinit.report import runs as runs_lib  # pylint: disable=g-import-not-at-top
  from reinit.report import stats  # pylint: disable=g-import-not-at-top
  import pandas as pd  # pylint: disable=g-import-not-at-top
  a, b = runs_lib.load_runs(root), runs_lib.load_runs(other)
  # The report's combination keys (label_noise too where runs differ in it), over both trees.
  keys = runs_lib.keys(pd.concat([a, b])) + ["method"]
  rows = []
  groups_b = {k: g for k, g in b.groupby(keys)}
  for key, group in a.groupby(keys):
    if key not in groups_b:
      continue
    accuracies, others = list(group.test_accuracy), list(groups_b[key].test_accuracy)
    rows.append({**dict(zip(keys, key)), "seeds": len(accuracies), "other_seeds": len(others),
                 **stats.within_noise(accuracies, others)})
  return rows


def markdown(rows: list[dict], root: str, other: str) -> str:
  lines = [f"Mean test accuracy (%) of {root} against {other}; agree: |Δ| <= 2 x combined "
           "standard error + 0.5.", "",
           "| dataset | model | train examples | method | seeds | mean | other mean | Δ | "
           "bound | agree |", "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    method = r["method"] + (f" (label_noise {r['label_noise']})" if "label_noise" in r else "")
    lines.append(f"| {r['dataset']} | {r['model']} | {r['train_examples']} | {method} | "
                 f"{r['seeds']} / {r['other_seeds']} | {100 * r['mean']:.2f} | "
                 f"{100 * r['other_mean']:.2f} | {100 * r['difference']:+.2f} | "
                 f"{100 * r['bound']:.2f} | {'yes' if r['agree'] else 'NO'} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("root", help="a directory of runs (results.json files)")
  parser.add_argument("other", help="the directory of runs to compare with")
  args = parser.parse_args(argv)
  rows = compare(args.root, args.other)
  if not rows:
    common.fail(f"no (dataset, model, train_examples, method) has runs in both {args.root} and "
                f"{args.other}; accepted: two trees of results.json of one study")
  print(markdown(rows, args.root, args.other))
  disagree = [r for r in rows if not r["agree"]]
  print(f"\n{len(rows) - len(disagree)} of {len(rows)} agree within noise")
  return 1 if disagree else 0


if __name__ == "__main__":
  sys.exit(main())
