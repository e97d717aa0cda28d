r"""The table of LW's standardization ablation (`configs/lw_ablation.py`), from its results.

  python -m launch.lw_ablation runs/lw_ablation

Reads every `results.json` under the folder and prints, per training-set size, each arm's test
accuracy (mean ± standard error over seeds) and its difference from the default LW arm, seed by
seed (same subset and initialization), with the standard error of that difference and a two-sided
paired t-test (scipy).
"""

import collections
import json
import sys

from etils import epath
import numpy as np
from scipy import stats

from launch import common

REFERENCE = "lw off"


def arm(results: dict) -> str:
  """'baseline', 'baseline_long', or 'lw POLICY[, rescale_zero_init]' of a run's config."""
  if results["method"] != "lw":
    return results["method"]
  lw = results["config"]["lw"]
  return (f"lw {lw['earlier_standardizations']}"
          + (", rescale_zero_init" if lw["rescale_zero_init"] else ""))


def accuracies(root: str) -> dict[int, dict[str, dict[int, float]]]:
  """{train_examples: {arm: {seed: test accuracy}}} of the runs under `root`."""
  table = collections.defaultdict(lambda: collections.defaultdict(dict))
  # RUN/results.json or SIZE/RUN/results.json (epath refuses recursive globs: on gs:// they
  # are thousands of requests).
  paths = [*epath.Path(root).glob("*/results.json"), *epath.Path(root).glob("*/*/results.json")]
  for path in sorted(paths):
    results = json.loads(path.read_text())
    table[results["train_examples"]][arm(results)][results["seed"]] = results["test_accuracy"]
  return table


def markdown(table) -> str:
  """Per size: arm, seeds, accuracy (%) mean ± s.e., paired difference to REFERENCE, p."""
  lines = ["| train examples | arm | seeds | test accuracy (%) | Δ vs lw off (pp, paired) | p |",
           "|---|---|---|---|---|---|"]
  for size in sorted(table):
    arms = table[size]
    reference = arms.get(REFERENCE, {})
    for name in sorted(arms, key=lambda a: (not a.startswith("baseline"), a)):
      by_seed = arms[name]
      values = 100 * np.array(list(by_seed.values()))
      cell = f"{values.mean():.2f} ± {stats.sem(values):.2f}" if len(values) > 1 else "—"
      seeds = sorted(set(by_seed) & set(reference))
      if name == REFERENCE or len(seeds) < 2:
        diff_cell, p_cell = "—", "—"
      else:
        diff = 100 * np.array([by_seed[s] - reference[s] for s in seeds])
        diff_cell = f"{diff.mean():+.2f} ± {stats.sem(diff):.2f}"
        p_cell = "1.00"  # identical accuracies: ttest_rel would divide by zero
        if np.any(diff):
          p_value = stats.ttest_rel([by_seed[s] for s in seeds],
                                    [reference[s] for s in seeds]).pvalue
          p_cell = f"{p_value:.2f}"
      lines.append(f"| {size} | {name} | {len(values)} | {cell} | {diff_cell} | {p_cell} |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    common.fail("usage: python -m launch.lw_ablation RESULTS_DIR")
  table = accuracies(argv[1])
  if not table:
    common.fail(f"RESULTS_DIR={argv[1]!r} holds no results.json; accepted: the workdir of "
                "configs/lw_ablation.py's sweeps")
  print(markdown(table))


if __name__ == "__main__":
  main(sys.argv)
