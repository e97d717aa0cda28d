"""The report's tables as DataFrames and markdown: Table 2 (accuracy per combination and
method), Table 3 (each method against the references) and the analysis table."""

from typing import Sequence

import numpy as np
import pandas as pd

from reinit.report import stats
from reinit.report.runs import EXTRA_KEYS, KEYS, REFERENCES, keys, method_order


def seed_means(runs: pd.DataFrame) -> pd.DataFrame:
  """Test accuracy per combination (`keys(runs)`) and method: mean, sem, n over seeds."""
  grouped = runs.groupby(keys(runs) + ["method"])["test_accuracy"]
  # scipy's sem, not pandas' "sem": pandas' grouped variance differs in the last digits, which
  # would change the CSVs.
  return grouped.agg(mean="mean", sem=stats.standard_error, n="count").reset_index()


def table2(runs: pd.DataFrame) -> pd.DataFrame:
  """Wide Table 2: one row per combination, columns `<method>_mean`, `_sem`, `_n` (fractions)."""
  means = seed_means(runs)
  wide = means.pivot(index=keys(runs), columns="method", values=["mean", "sem", "n"])
  columns = {}
  for method in method_order(means["method"].unique()):
    for stat in ("mean", "sem", "n"):
      columns[f"{method}_{stat}"] = wide[(stat, method)]
  return pd.DataFrame(columns).reset_index()


def _methods_of(table: pd.DataFrame) -> list[str]:
  return [c[:-len("_mean")] for c in table.columns if c.endswith("_mean")]


def _cell(mean: float, sem: float) -> str:
  if np.isnan(mean):
    return "–"
  text = f"{100 * mean:.2f}"
  return text if np.isnan(sem) else f"{text} ± {100 * sem:.2f}"


# Hand-written, not DataFrame.to_markdown(): tabulate pads every cell to its column's width,
# which would change the tables' text (and needs one more dependency).
def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]],
              align: Sequence[str] | None = None) -> str:
  align = align or ["l"] * len(header)
  rule = ["---:" if a == "r" else ":---" for a in align]
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _headers(extra_keys: Sequence[str]) -> list[str]:
  return [k.replace("_", " ") for k in extra_keys]


def size_text(n) -> str:
  """A train_examples value as text: -1 (the whole training set) -> "all"."""
  return "all" if int(n) < 0 else str(int(n))


def table2_markdown(table: pd.DataFrame) -> str:
  """Table 2 in markdown: test accuracy (%) mean ± sem, the best mean of each row in bold."""
  methods = _methods_of(table)
  extra = [k for k in EXTRA_KEYS if k in table]
  rows = []
  for _, row in table.iterrows():
    means = np.array([row[f"{m}_mean"] for m in methods], np.float64)
    best = np.nanmax(means) if np.any(~np.isnan(means)) else np.nan
    cells = []
    for m, mean in zip(methods, means):
      cell = _cell(mean, row[f"{m}_sem"])
      if not np.isnan(mean) and mean >= best - stats.TIE_TOLERANCE:
        cell = f"**{cell}**"
      cells.append(cell)
    rows.append([row["dataset"], row["model"], size_text(row["train_examples"]),
                 *[row[k] for k in extra], *cells])
  header = ["dataset", "model", "train examples", *_headers(extra), *methods]
  return ("Test accuracy (%), mean ± standard error over seeds; best mean per row in bold.\n\n"
          + _markdown(header, rows, ["l", "l", "r"] + ["r"] * (len(extra) + len(methods))))


def table3(runs: pd.DataFrame) -> pd.DataFrame:
  """Each method against each present reference, Holm-corrected per reference.

  Against `baseline`: every other method (baseline_long included); against `baseline_long`:
  every method but the two references. Columns: reference, method, combos, wins, losses, ties,
  p_value, p_holm, significant (p_holm <= 0.05), mean_gain (fraction of accuracy).
  """
  means = seed_means(runs).pivot(index=keys(runs), columns="method", values="mean")
  rows = []
  for reference in REFERENCES:
    if reference not in means:
      continue
    others = [m for m in method_order(means.columns)
              if m != reference and (reference == "baseline" or m not in REFERENCES)]
    family = [{"reference": reference, "method": m, **stats.compare(means[m], means[reference])}
              for m in others]
    for row, p in zip(family, stats.holm([r["p_value"] for r in family])):
      row["p_holm"] = float(p)
      row["significant"] = bool(p <= stats.ALPHA)
    rows += family
  columns = ["reference", "method", "combos", "wins", "losses", "ties", "p_value", "p_holm",
             "significant", "mean_gain"]
  return pd.DataFrame(rows, columns=columns)


def table3_markdown(table: pd.DataFrame) -> str:
  """Table 3 in markdown; gains in percentage points, * marks p_holm <= 0.05."""
  rows = [[r.reference, r.method, r.combos, r.wins, r.losses, r.ties, f"{r.p_value:.4g}",
           f"{r.p_holm:.4g}" + (" *" if r.significant else ""),
           "–" if np.isnan(r.mean_gain) else f"{100 * r.mean_gain:+.2f}"]
          for r in table.itertuples()]
  header = ["reference", "method", "combinations", "wins", "losses", "ties", "p (binomial)",
            "p (Holm)", "mean gain (pp)"]
  return ("Method vs reference over the combinations (rows of Table 2) where both ran, seed-mean "
          "test accuracy; exact two-sided binomial test of wins vs losses (ties dropped), Holm "
          f"correction per reference; * p (Holm) <= {stats.ALPHA}.\n\n"
          + _markdown(header, rows, ["l", "l"] + ["r"] * 7))


def analysis_table(analyses: pd.DataFrame) -> pd.DataFrame:
  """Means over seeds of every analysis metric per (dataset, model, train_examples, method),
  with `runs` the number of analyzed runs; methods in `method_order`."""
  by = keys(analyses) + ["method"]
  metrics = [c for c in analyses.columns
             if c not in KEYS + EXTRA_KEYS + ["method", "seed", "run_dir"]]
  table = analyses.groupby(by)[metrics].mean()
  table.insert(0, "runs", analyses.groupby(by).size())
  table = table.reset_index()
  rank = {m: i for i, m in enumerate(method_order(table["method"].unique()))}
  return table.sort_values(by, key=lambda s: s.map(rank) if s.name == "method"
                           else s).reset_index(drop=True)


_ANALYSIS_HEADERS = {
    "median_margin": "median margin",
    "median_normalized_margin": "median normalized margin",
    "sum_frobenius_folded": "Σ‖W̃‖_F (BN-folded)",
    "log10_product_spectral": "log10 Π‖W̃‖₂ (BN-folded)",
    "sum_frobenius": "Σ‖W‖_F (raw kernels)",
    "hessian_folded_top_eigenvalue": "top Hessian eigenvalue (BN-folded)",
    "hessian_top_eigenvalue": "top Hessian eigenvalue (raw params)",
    "memorized": "memorized (corrupted)",
    "corrupted_true_accuracy": "true label (corrupted)",
    "clean_accuracy": "accuracy (clean)",
}


def _number(value: float) -> str:
  if value is None or np.isnan(value):
    return "–"
  return f"{value:.4g}"


def analysis_markdown(table: pd.DataFrame) -> str:
  """The analysis table in markdown; metric columns that are NaN everywhere are dropped."""
  extra = [k for k in EXTRA_KEYS if k in table]
  metrics = [c for c in table.columns if c not in KEYS + extra + ["method", "runs"]
             and table[c].notna().any()]
  header = ["dataset", "model", "train examples", *_headers(extra), "method", "runs"]
  header += [_ANALYSIS_HEADERS.get(c, c.replace("loss_increase@", "Δloss σ=")) for c in metrics]
  rows = [[r["dataset"], r["model"], size_text(r["train_examples"]), *[r[k] for k in extra],
           r["method"], int(r["runs"])] + [_number(r[c]) for c in metrics]
          for _, r in table.iterrows()]
  return ("Analyses of the trained networks, means over analyzed seeds. Margins on the training "
          "set (normalized: divided by Π‖W̃‖₂); W̃: a conv/dense kernel with the BatchNorm after "
          "it folded in (eval mode), W: the raw kernel; Δloss: training-loss increase under "
          "Gaussian weight noise of scale σ relative to each tensor's norm; top Hessian "
          "eigenvalue of the training loss w.r.t. the BN-folded parameters or the raw params; "
          "memorization on label-noise runs.\n\n"
          + _markdown(header, rows, ["l", "l", "r"] + ["r"] * len(extra) + ["l"]
                      + ["r"] * (len(header) - 4 - len(extra)))
          + "\n\n" + ANALYSIS_LEGEND)


# What each measure is invariant to (tests/test_analysis.py checks the BN-rescaling claims on
# the Hessians and Δloss; the rest follows from the definitions in reinit/analysis/margins.py).
ANALYSIS_LEGEND = (
    "Invariance. *BN rescaling*: a kernel followed by BatchNorm × c > 0 (whole tensor or per "
    "output channel) with that BatchNorm's running mean × c and var + ε × c², which leaves the "
    "eval-mode network unchanged (LW's rescaling of a kept kernel to its initial norm is one, "
    "once the running statistics have caught up). "
    "Invariant to it: margins, Π‖W̃‖₂ and the normalized margin, Σ‖W̃‖_F, the BN-folded top "
    "Hessian eigenvalue. Δloss: invariant to a whole-tensor c (the noise is relative to the "
    "tensor's norm), not to a per-channel c. Not invariant: Σ‖W‖_F (that kernel's term × c) "
    "and the raw top Hessian eigenvalue (that kernel's block of the Hessian × 1/c²). "
    "*ReLU rescaling*: one layer's W̃ and bias × c > 0, the next layer's W̃ × 1/c (the same "
    "network): margins, Π‖W̃‖₂ and the normalized margin are invariant; Σ‖W̃‖_F and the "
    "BN-folded Hessian are not.")
