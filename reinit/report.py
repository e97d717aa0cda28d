r"""Results -> the paper's tables and figures: `python -m reinit.report DIR [--out OUT]`.

Reads every `results.json` under DIR (recursively; one per run, see DESIGN.md "Results format")
and every `analysis.json` next to one (written by `launch.analyze`), and writes into OUT
(default DIR/report):

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
same from Python and returns the tables. Needs pandas, scipy and matplotlib (Agg, no display).
"""

import argparse
import collections
import json
import math
import os
import sys
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

RESULTS_FILE = "results.json"
ANALYSIS_FILE = "analysis.json"
REFERENCES = ("baseline", "baseline_long")
KEYS = ["dataset", "model", "train_examples"]  # one row of Table 2: a "combination"
# Config fields that also tell combinations apart, where the runs under DIR differ in them.
EXTRA_KEYS = ["label_noise"]
# Config fields that may differ between the seeds of one combination and method.
_PER_RUN_FIELDS = {"seed", "subset_seed", "data_dir", "log_every_steps",
                   "checkpoint_every_steps"}
_TIE_TOLERANCE = 1e-12  # seed-mean accuracies closer than this are a tie
_ALPHA = 0.05


# ---------------------------------------------------------------- statistics (pure)


def standard_error(values: Sequence[float]) -> float:
  """std(ddof=1) / sqrt(n) of `values`; NaN for fewer than two values."""
  values = np.asarray(values, np.float64)
  if values.size < 2:
    return float("nan")
  return float(np.std(values, ddof=1) / math.sqrt(values.size))


def holm(p_values: Sequence[float]) -> np.ndarray:
  """Holm step-down adjusted p-values, in the input order.

  With p sorted ascending, p_(i) -> max_{j <= i} min(1, (m - j + 1) p_(j)) (1-based j): the
  family-wise error rate is controlled at alpha by rejecting where the adjusted p <= alpha.
  """
  p = np.asarray(p_values, np.float64)
  m = p.size
  order = np.argsort(p, kind="stable")
  scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
  adjusted = np.empty(m)
  adjusted[order] = np.maximum.accumulate(scaled)
  return adjusted


def sign_test(wins: int, losses: int) -> float:
  """Exact two-sided binomial test of wins vs losses at p = 1/2 (ties already dropped).

  1.0 when there is nothing to compare (no wins and no losses).
  """
  if wins + losses == 0:
    return 1.0
  return float(stats.binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue)


def compare(method_means: Sequence[float], reference_means: Sequence[float]) -> dict:
  """Wins/losses/ties of `method_means` (C,) against `reference_means` (C,), paired by row;
  rows where either is NaN are left out. Returns combos, wins, losses, ties, p_value (sign
  test) and mean_gain (mean of the differences, same units as the inputs; NaN if no rows)."""
  a = np.asarray(method_means, np.float64)
  b = np.asarray(reference_means, np.float64)
  both = ~(np.isnan(a) | np.isnan(b))
  diff = a[both] - b[both]
  wins, losses = int(np.sum(diff > _TIE_TOLERANCE)), int(np.sum(diff < -_TIE_TOLERANCE))
  return {"combos": int(diff.size), "wins": wins, "losses": losses,
          "ties": int(diff.size) - wins - losses, "p_value": sign_test(wins, losses),
          "mean_gain": float(np.mean(diff)) if diff.size else float("nan")}


# ---------------------------------------------------------------- reading


def _find(results_dir: str, name: str) -> list[str]:
  found = []
  for root, dirs, files in os.walk(results_dir):
    dirs.sort()
    if name in files:
      found.append(os.path.join(root, name))
  return sorted(found)


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)


def keys(table: pd.DataFrame) -> list[str]:
  """The combination keys of `table`: KEYS, plus each EXTRA_KEYS column whose values differ."""
  return KEYS + [k for k in EXTRA_KEYS if k in table and table[k].nunique() > 1]


def _flatten(config: dict, prefix: str = "") -> dict:
  """{'lw': {'rescale': True}} -> {'lw.rescale': True}."""
  flat = {}
  for name, value in (config or {}).items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{name}."))
    else:
      flat[f"{prefix}{name}"] = json.dumps(value, sort_keys=True)
  return flat


def _label_noise(results: dict) -> float:
  return float((results.get("config") or {}).get("label_noise") or 0.0)


def _run_row(path: str, results: dict) -> dict:
  compute = results.get("compute") or {}
  train_examples = results.get("train_examples")
  return {
      "dataset": results["dataset"], "model": results["model"], "method": results["method"],
      "seed": results["seed"],
      "train_examples": -1 if train_examples is None else int(train_examples),
      "test_accuracy": float(results["test_accuracy"]),
      "train_accuracy": float(results.get("train_accuracy", float("nan"))),
      "total_epochs": float(results.get("total_epochs", float("nan"))),
      "wall_time_s": float(results.get("wall_time_s", float("nan"))),
      "train_flops": float(compute.get("train_flops", float("nan")) or float("nan")),
      "label_noise": _label_noise(results),
      "run_dir": os.path.dirname(path),
      "config": _flatten(results.get("config")),
      "provenance": provenance_items(results.get("provenance")),
  }


def _pooled_differences(runs: pd.DataFrame) -> list[str]:
  """Config fields (outside `_PER_RUN_FIELDS`) that differ between runs pooled as seeds."""
  fields = set()
  for _, group in runs.groupby(keys(runs) + ["method"]):
    configs = list(group["config"])
    names = set().union(*configs) - _PER_RUN_FIELDS
    fields |= {n for n in names if len({c.get(n) for c in configs}) > 1}
  return sorted(fields)


def load_runs(results_dir: str) -> pd.DataFrame:
  """One row per `results.json` under `results_dir` (unreadable files are skipped with a
  warning): dataset, model, method, seed, train_examples (-1 when unknown), test_accuracy,
  train_accuracy, total_epochs, wall_time_s, train_flops (NaN when not reported), label_noise
  (0 when not set), run_dir, config (flattened, values as JSON text).

  Warns when runs that will be pooled as the seeds of one combination and method differ in
  their config beyond the seed, or repeat a seed."""
  rows = []
  for path in _find(results_dir, RESULTS_FILE):
    try:
      with open(path) as f:
        rows.append(_run_row(path, json.load(f)))
    except (OSError, ValueError, KeyError, TypeError) as e:
      _warn(f"skipped {path}: {type(e).__name__}: {e}")
  columns = ["dataset", "model", "method", "seed", "train_examples", "test_accuracy",
             "train_accuracy", "total_epochs", "wall_time_s", "train_flops", "label_noise",
             "run_dir", "config", "provenance"]
  runs = pd.DataFrame(rows, columns=columns)
  differing = _pooled_differences(runs)
  if differing:
    _warn(f"runs pooled as seeds of one (dataset, model, train_examples, method) differ in "
          f"config fields {', '.join(differing)}; report such sweeps from separate directories")
  duplicated = runs.duplicated(keys(runs) + ["method", "seed"], keep=False)
  if duplicated.any():
    # Counted as separate seeds below, which would shrink the standard errors: say so.
    _warn(f"{int(duplicated.sum())} runs share (dataset, model, train_examples, method, seed) "
          f"with another, e.g. {runs[duplicated].iloc[0]['run_dir']}")
  return runs


def method_order(methods: Sequence[str]) -> list[str]:
  """The references first (baseline, baseline_long), then the other methods alphabetically."""
  present = set(methods)
  return [m for m in REFERENCES if m in present] + sorted(present - set(REFERENCES))


# ---------------------------------------------------------------- provenance


# The order of the footer; packages not listed here follow in their recorded order.
_PROVENANCE_ORDER = ("python", "jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint",
                     "tensorflow-datasets", "tensorflow", "tensorflow-cpu", "devices", "code",
                     "XLA_FLAGS")
_NOT_RECORDED = "not recorded"


def provenance_items(provenance: dict | None) -> dict[str, str]:
  """A results.json `provenance` (reinit/provenance.py) as {name: text} for the footer; {} when
  the run recorded none. Packages that are not installed and the `reinit` version (the code
  commit says more) are left out."""
  if not provenance:
    return {}
  items = {"python": str(provenance.get("python"))}
  items.update({name: str(version) for name, version in (provenance.get("packages") or {}).items()
                if version is not None and name != "reinit"})
  devices = provenance.get("devices") or {}
  if devices:
    processes = devices.get("process_count")
    items["devices"] = (f"{devices.get('count')} × {devices.get('kind')}, {processes} "
                        f"process{'es' if processes != 1 else ''}")
  code = provenance.get("code")
  items["code"] = ("not a git checkout" if code is None else
                   code["commit"][:12] + (" (dirty tree)" if code.get("dirty") else ""))
  items["XLA_FLAGS"] = provenance.get("xla_flags") or "(none)"
  return items


def provenance_footer(runs: pd.DataFrame) -> str:
  """One line naming what made the runs: each item's distinct values over the runs, with the
  number of runs of each value when they differ (`jax 0.10.2 (30 runs), 0.10.1 (6 runs)`)."""
  per_run = list(runs["provenance"])
  names = [n for n in _PROVENANCE_ORDER if any(n in items for items in per_run)]
  names += [n for items in per_run for n in items if n not in names]
  names = list(dict.fromkeys(names))
  parts = []
  for name in names:
    # Most frequent first; ties in the order the runs were read.
    counts = collections.Counter(items.get(name, _NOT_RECORDED) for items in per_run)
    if len(counts) == 1:
      parts.append(f"{name} {next(iter(counts))}")
    else:
      parts.append(f"{name} " + ", ".join(f"{value} ({n} run{'s' if n != 1 else ''})"
                                          for value, n in counts.most_common()))
  missing = sum(1 for items in per_run if not items)
  if missing:
    parts.append(f"provenance {_NOT_RECORDED} by {missing} of {len(per_run)} runs")
  return f"Made with ({len(per_run)} runs): " + "; ".join(parts) + "."


# ---------------------------------------------------------------- Table 2


def seed_means(runs: pd.DataFrame) -> pd.DataFrame:
  """Test accuracy per combination (`keys(runs)`) and method: mean, sem, n over seeds."""
  grouped = runs.groupby(keys(runs) + ["method"])["test_accuracy"]
  out = grouped.agg(mean="mean", n="count").join(grouped.agg(standard_error).rename("sem"))
  return out[["mean", "sem", "n"]].reset_index()


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


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]],
              align: Sequence[str] | None = None) -> str:
  align = align or ["l"] * len(header)
  rule = ["---:" if a == "r" else ":---" for a in align]
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _headers(extra_keys: Sequence[str]) -> list[str]:
  return [k.replace("_", " ") for k in extra_keys]


def _size(n) -> str:
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
      if not np.isnan(mean) and mean >= best - _TIE_TOLERANCE:
        cell = f"**{cell}**"
      cells.append(cell)
    rows.append([row["dataset"], row["model"], _size(row["train_examples"]),
                 *[row[k] for k in extra], *cells])
  header = ["dataset", "model", "train examples", *_headers(extra), *methods]
  return ("Test accuracy (%), mean ± standard error over seeds; best mean per row in bold.\n\n"
          + _markdown(header, rows, ["l", "l", "r"] + ["r"] * (len(extra) + len(methods))))


# ---------------------------------------------------------------- Table 3


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
    family = [{"reference": reference, "method": m, **compare(means[m], means[reference])}
              for m in others]
    for row, p in zip(family, holm([r["p_value"] for r in family])):
      row["p_holm"] = float(p)
      row["significant"] = bool(p <= _ALPHA)
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
          f"correction per reference; * p (Holm) <= {_ALPHA}.\n\n"
          + _markdown(header, rows, ["l", "l"] + ["r"] * 7))


# ---------------------------------------------------------------- analyses


def _analysis_row(path: str, analysis: dict, run_keys: dict) -> dict:
  row = dict(run_keys)
  margins, norms = analysis.get("margins") or {}, analysis.get("norms") or {}
  row["median_margin"] = (margins.get("train") or {}).get("median", np.nan)
  row["median_normalized_margin"] = (margins.get("train_normalized") or {}).get("median", np.nan)
  # Column order is the table's: the BN-folded (function-level) measures before the raw ones.
  row["sum_frobenius_folded"] = norms.get("sum_frobenius_folded", np.nan)
  row["log10_product_spectral"] = norms.get("log10_product_spectral", np.nan)
  row["sum_frobenius"] = norms.get("sum_frobenius", np.nan)
  flatness = analysis.get("flatness") or {}
  for sigma, mean in zip(flatness.get("noise_scales", []), flatness.get("mean", [])):
    row[f"loss_increase@{sigma:g}"] = mean
  row["hessian_folded_top_eigenvalue"] = (analysis.get("hessian_folded") or {}).get(
      "eigenvalue", np.nan)
  row["hessian_top_eigenvalue"] = (analysis.get("hessian") or {}).get("eigenvalue", np.nan)
  memorization = analysis.get("memorization") or {}
  for key in ("memorized", "corrupted_true_accuracy", "clean_accuracy"):
    row[key] = memorization.get(key, np.nan)
  row["run_dir"] = os.path.dirname(path)
  return row


def load_analyses(results_dir: str) -> pd.DataFrame:
  """One row per `analysis.json` under `results_dir`, keyed like the runs (from the run's
  results.json when present, else from the analysis' own `run` record)."""
  rows = []
  for path in _find(results_dir, ANALYSIS_FILE):
    try:
      with open(path) as f:
        analysis = json.load(f)
      results_path = os.path.join(os.path.dirname(path), RESULTS_FILE)
      if os.path.exists(results_path):
        with open(results_path) as f:
          source = json.load(f)
      else:
        source = analysis["run"]
      examples = source.get("train_examples")
      run_keys = {k: source[k] for k in ("dataset", "model", "method", "seed")}
      run_keys["train_examples"] = -1 if examples is None else int(examples)
      run_keys["label_noise"] = (_label_noise(source) if "config" in source else
                                 float((analysis.get("memorization") or {}).get("label_noise", 0)))
      rows.append(_analysis_row(path, analysis, run_keys))
    except (OSError, ValueError, KeyError, TypeError) as e:
      _warn(f"skipped {path}: {type(e).__name__}: {e}")
  return pd.DataFrame(rows)


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
  rows = [[r["dataset"], r["model"], _size(r["train_examples"]), *[r[k] for k in extra],
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


# ---------------------------------------------------------------- figures


def _new_figure(width: float = 7.0, height: float = 4.5):
  # The object-oriented API with an explicit Agg canvas: no pyplot state, no display needed.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot()


# Matplotlib's ten default colours, then two more that none of them resembles: every one of
# the twelve methods gets its own colour.
_COLORS = tuple(f"C{i}" for i in range(10)) + ("black", "gold")


def method_colors(methods: Sequence[str]) -> dict[str, str]:
  """One colour per method, by its place in `method_order`: the same in every figure."""
  return {m: _COLORS[i % len(_COLORS)] for i, m in enumerate(method_order(methods))}


def _save(fig, path: str) -> str:
  fig.savefig(path, dpi=120)
  return path


def gains_by_size(runs: pd.DataFrame, reference: str = "baseline") -> pd.DataFrame:
  """Seed-mean accuracy gain over `reference` per (method, train_examples), averaged over the
  combinations of that size (datasets, models) where both exist: columns method,
  train_examples, gain (mean fraction), sem (over combinations), pairs (their number)."""
  means = seed_means(runs).pivot(index=keys(runs), columns="method", values="mean")
  if reference not in means:
    return pd.DataFrame(columns=["method", "train_examples", "gain", "sem", "pairs"])
  rows = []
  for method in method_order(means.columns):
    if method == reference:
      continue
    gain = (means[method] - means[reference]).dropna()
    for size, values in gain.groupby(level="train_examples"):
      rows.append({"method": method, "train_examples": size, "gain": float(values.mean()),
                   "sem": standard_error(values), "pairs": int(values.size)})
  return pd.DataFrame(rows, columns=["method", "train_examples", "gain", "sem", "pairs"])


def plot_gain_vs_size(runs: pd.DataFrame, path: str) -> str | None:
  """gain_vs_size.png; None (nothing written) when there is no baseline to compare with."""
  gains = gains_by_size(runs)
  gains = gains[gains["train_examples"] > 0]
  if gains.empty:
    return None
  fig, ax = _new_figure()
  methods = method_order(gains["method"].unique())
  colors = method_colors(runs["method"].unique())
  for i, method in enumerate(methods):
    g = gains[gains["method"] == method].sort_values("train_examples")
    # Small multiplicative offsets keep overlapping error bars apart on the log axis.
    x = g["train_examples"] * 1.015 ** (i - (len(methods) - 1) / 2)
    ax.errorbar(x, 100 * g["gain"], yerr=100 * g["sem"].fillna(0), marker="o", capsize=3,
                color=colors[method], label=method)
  ax.axhline(0.0, color=colors.get("baseline", "gray"), linewidth=1, linestyle="--",
             label="baseline")
  ax.set_xscale("log")
  sizes = sorted(gains["train_examples"].unique())
  ax.set_xticks(sizes, [str(int(s)) for s in sizes])
  ax.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)  # centred, also for a single size
  ax.minorticks_off()
  ax.set_xlabel("training examples (log scale)")
  ax.margins(y=0.1)
  ax.set_ylabel("test accuracy gain over baseline (percentage points)")
  fig.suptitle("Gain over baseline vs training-set size\n(mean over datasets and models; "
               "bars: standard error over them)", fontsize=10)
  ax.legend(title="method", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return _save(fig, path)


def _panel_title(key: dict) -> str:
  """{'model': 'resnet18', 'train_examples': 1000} -> 'resnet18, 1000 training examples'."""
  parts = [key["model"], f"{_size(key['train_examples'])} training examples"]
  parts += [f"{k.replace('_', ' ')} {v:g}" for k, v in key.items() if k in EXTRA_KEYS]
  return ", ".join(parts)


def plot_per_dataset(runs: pd.DataFrame, path: str) -> str:
  """per_dataset.png: bars of seed-mean test accuracy per dataset and method, sem error bars.

  One panel per (model, train_examples), so that no bar averages over architectures or sizes.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  means = seed_means(runs)
  methods = method_order(means["method"].unique())
  panel_keys = [k for k in keys(runs) if k != "dataset"]
  panels = [key for key, _ in means.groupby(panel_keys)]
  most_datasets = int(means.groupby(panel_keys)["dataset"].nunique().max())
  panel_width = min(14.0, max(4.5, 0.3 * most_datasets * len(methods) + 1.5))
  columns = max(1, min(len(panels), int(15 // panel_width)))
  rows = math.ceil(len(panels) / columns)
  fig = Figure(figsize=(panel_width * columns + 1.5, 3.4 * rows + 0.6), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, columns, squeeze=False, sharey=True)
  width = min(0.8 / len(methods), 0.2)  # narrow bars even with one or two methods
  # Zoom on the accuracies (the differences are the point); the label says where the axis starts.
  lowest = float(np.nanmin(100 * (means["mean"] - means["sem"].fillna(0))))
  bottom = max(0.0, 10 * math.floor(lowest / 10) - 10)
  for ax, key in zip(axes.flat, panels):
    panel = means[(means[panel_keys] == pd.Series(key, index=panel_keys)).all(axis=1)]
    datasets = sorted(panel["dataset"].unique())
    for i, method in enumerate(methods):
      m = pd.DataFrame({"dataset": datasets}).merge(panel[panel["method"] == method],
                                                    on="dataset", how="left")
      x = np.arange(len(datasets)) + (i - (len(methods) - 1) / 2) * width
      bars = ax.bar(x, 100 * m["mean"], width, yerr=100 * m["sem"], capsize=2,
                    color=method_colors(methods)[method], label=method)
      if len(datasets) * len(methods) <= 12:
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xlim(-0.6, len(datasets) - 0.4)
    ax.set_xticks(np.arange(len(datasets)), datasets)
    ax.set_ylim(bottom, 102)
    ax.set_title(_panel_title(dict(zip(panel_keys, key))), fontsize=9)
    ax.set_xlabel("dataset")
  for ax in axes[:, 0]:
    ax.set_ylabel("test accuracy (%)" + (f", axis from {bottom:.0f}" if bottom > 0 else ""))
  for ax in list(axes.flat)[len(panels):]:
    ax.set_visible(False)
  fig.suptitle("Test accuracy per dataset and method (mean ± standard error over seeds)",
               fontsize=10)
  # On the top-right panel, outside it: constrained layout makes room for an axes legend
  # (a figure legend would collide with the suptitle).
  axes[0, -1].legend(*axes[0, 0].get_legend_handles_labels(), title="method", fontsize=8,
                     loc="upper left", bbox_to_anchor=(1.02, 1.0))
  return _save(fig, path)


def _sideways_offsets(compute: pd.Series, methods: Sequence[str]) -> dict[str, float]:
  """Per method, a centred index among the methods with the same mean compute (0 when alone),
  so that only methods that would sit on top of each other are moved apart."""
  offsets = {}
  for value in compute.unique():
    same = [m for m in methods if np.isclose(compute[m], value)]
    offsets.update({m: i - (len(same) - 1) / 2 for i, m in enumerate(same)})
  return offsets


def plot_compute_vs_accuracy(runs: pd.DataFrame, path: str) -> str:
  """compute_vs_accuracy.png: test accuracy vs training compute per method.

  Compute is train FLOPs when every run reports them, else total epochs. Small points: each
  (dataset, model, train_examples), seed means; large markers with bars: the method's mean and
  standard error over those combinations (shown alone when there is one combination). Methods
  sharing a compute value are spread slightly sideways so that they do not hide each other.
  """
  use_flops = bool(runs["train_flops"].notna().all())
  compute = "train_flops" if use_flops else "total_epochs"
  grouped = runs.groupby(keys(runs) + ["method"])
  points = grouped[[compute, "test_accuracy"]].mean().join(
      grouped["test_accuracy"].agg(standard_error).rename("sem")).reset_index()
  methods = method_order(points["method"].unique())
  several = len(points[keys(runs)].drop_duplicates()) > 1
  fig, ax = _new_figure(8.0, 4.8)
  markers = "osD^vP*Xh<>"
  span = float(points[compute].max())
  offsets = _sideways_offsets(points.groupby("method")[compute].mean(), methods)
  colors = method_colors(methods)
  for i, method in enumerate(methods):
    p = points[points["method"] == method]
    # At most a few percent apart: side by side, never seemingly of different compute.
    shift = 0.01 * offsets[method]
    x = p[compute] * (1 + shift) if use_flops else p[compute] + shift * span
    marker = markers[i % len(markers)]
    if several:
      ax.scatter(x, 100 * p["test_accuracy"], s=10, alpha=0.35, color=colors[method],
                 marker=marker)
      ax.errorbar(x.mean(), 100 * p["test_accuracy"].mean(),
                  yerr=100 * np.nan_to_num(standard_error(p["test_accuracy"])),
                  marker=marker, markersize=9, capsize=4, color=colors[method], markeredgecolor="k",
                  label=f"{method} ({len(p)})")
    else:
      ax.errorbar(x, 100 * p["test_accuracy"], yerr=100 * p["sem"].fillna(0), marker=marker,
                  markersize=8, linestyle="none", capsize=4, color=colors[method], label=method)
  if use_flops:
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs, log scale)")
  else:
    ax.set_xlim(0, 1.1 * span)
    ax.set_xlabel("training compute (total epochs)")
  ax.margins(y=0.08)
  ax.set_ylabel("test accuracy (%)")
  detail = ("small points: each dataset, model and size (seed mean)\nlarge: their mean ± "
            "standard error" if several else "mean ± standard error over seeds")
  detail += "; methods of equal compute drawn side by side"
  fig.suptitle(f"Test accuracy vs training compute\n{detail}", fontsize=9)
  ax.legend(title="method (combinations)" if several else "method", fontsize=8,
            loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return _save(fig, path)


# ---------------------------------------------------------------- the report


def _write(path: str, text: str) -> str:
  with open(path, "w") as f:
    f.write(text + "\n")
  return path


def build_report(results_dir: str, out_dir: str | None = None) -> dict:
  """Reads `results_dir`, writes the report into `out_dir` (default results_dir/report).

  Returns a dict: runs, table2, table3, analysis (DataFrames; analysis None without any
  analysis.json), markdown ({'table2', 'table3', 'analysis'} strings) and files (name -> path
  of every file written; a figure that could not be drawn is absent).

  Raises:
    ValueError: no results.json under `results_dir` (one line).
  """
  out_dir = out_dir or os.path.join(results_dir, "report")
  runs = load_runs(results_dir)
  if runs.empty:
    raise ValueError(f"no readable {RESULTS_FILE} under {results_dir!r}")
  os.makedirs(out_dir, exist_ok=True)
  files = {"runs.csv": os.path.join(out_dir, "runs.csv")}
  runs.drop(columns=["config", "provenance"]).to_csv(files["runs.csv"], index=False)

  t2, t3 = table2(runs), table3(runs)
  footer = "\n\n" + provenance_footer(runs)
  markdown = {"table2": table2_markdown(t2) + footer, "table3": table3_markdown(t3) + footer,
              "analysis": None}
  for name, table in (("table2", t2), ("table3", t3)):
    table.to_csv(os.path.join(out_dir, f"{name}.csv"), index=False)
    files[f"{name}.csv"] = os.path.join(out_dir, f"{name}.csv")
    files[f"{name}.md"] = _write(os.path.join(out_dir, f"{name}.md"), markdown[name])

  analyses = load_analyses(results_dir)
  analysis = None
  if not analyses.empty:
    analysis = analysis_table(analyses)
    markdown["analysis"] = analysis_markdown(analysis)
    analysis.to_csv(os.path.join(out_dir, "analysis.csv"), index=False)
    files["analysis.csv"] = os.path.join(out_dir, "analysis.csv")
    files["analysis.md"] = _write(os.path.join(out_dir, "analysis.md"), markdown["analysis"])

  figures = {"gain_vs_size.png": plot_gain_vs_size,
             "per_dataset.png": plot_per_dataset,
             "compute_vs_accuracy.png": plot_compute_vs_accuracy}
  # The figures show the benchmark: the runs without label noise, when there are any.
  clean = runs[runs["label_noise"] == 0] if (runs["label_noise"] == 0).any() else runs
  for name, plot in figures.items():
    written = plot(clean, os.path.join(out_dir, name))
    if written:
      files[name] = written
  return {"runs": runs, "table2": t2, "table3": t3, "analysis": analysis,
          "markdown": markdown, "files": files}


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one line, `error: ...`, exit status 2."""

  def error(self, message):
    print(f"error: {message}; usage: python -m reinit.report DIR [--out OUT]", file=sys.stderr)
    sys.exit(2)


def main(argv: Sequence[str] | None = None) -> int:
  parser = _Parser(prog="python -m reinit.report", description=__doc__.splitlines()[0])
  parser.add_argument("results_dir", metavar="DIR", help="directory of runs (searched recursively)")
  parser.add_argument("--out", default=None, help="output directory (default DIR/report)")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.results_dir):
    parser.error(f"DIR={args.results_dir!r} is not a directory; accepted: a directory holding "
                 f"{RESULTS_FILE} files")
  try:
    report = build_report(args.results_dir, args.out)
  except ValueError as e:
    print(f"error: DIR={args.results_dir!r}: {e}; accepted: a directory holding "
          f"{RESULTS_FILE} files", file=sys.stderr)
    return 2
  print("## Table 2\n\n" + report["markdown"]["table2"] + "\n")
  print("## Table 3\n\n" + report["markdown"]["table3"] + "\n")
  if report["markdown"]["analysis"]:
    print("## Analyses\n\n" + report["markdown"]["analysis"] + "\n")
  for name, path in report["files"].items():
    if name.endswith(".png"):
      print(f"figure: {path}")
  print(f"report: {os.path.dirname(report['files']['runs.csv'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
