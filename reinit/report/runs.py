"""Reading a tree of runs into DataFrames: every results.json (one row per run) and every
analysis.json (one row per analyzed run) under a directory, local or remote (`etils.epath`:
`gs://` works)."""

import json
import sys
from typing import Sequence

from etils import epath
import numpy as np
import pandas as pd

from reinit.report import provenance
from reinit.workdir import ANALYSIS_FILE
from reinit.workdir import flat_config
from reinit.workdir import RESULTS_FILE
from reinit.workdir import with_added_fields

REFERENCES = ("baseline", "baseline_long")
KEYS = ["dataset", "model", "train_examples"]  # one row of Table 2: a "combination"
# Config fields that also tell combinations apart, where the runs under DIR differ in them.
EXTRA_KEYS = ["label_noise"]
# Config fields that may differ between the seeds of one combination and method.
_PER_RUN_FIELDS = {"seed", "subset_seed", "data_dir", "log_every_steps",
                   "checkpoint_every_steps"}


def _find(results_dir: epath.PathLike, name: str) -> list[epath.Path]:
  """Every file `name` under `results_dir` (recursively), sorted by path. `walk`, not
  `rglob`: epath refuses `**` on remote file systems."""
  found = [root / name for root, _, files in epath.Path(results_dir).walk() if name in files]
  return sorted(found, key=str)


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)


def keys(table: pd.DataFrame) -> list[str]:
  """The combination keys of `table`: KEYS, plus each EXTRA_KEYS column whose values differ."""
  return KEYS + [k for k in EXTRA_KEYS if k in table and table[k].nunique() > 1]


def _run_config(results: dict) -> dict:
  """The run's config flattened as its workdir's claim reads it (`flat_config`, with the
  `ADDED_FIELDS` it lacks at their old-behaviour values), each value as JSON text."""
  flat = with_added_fields(flat_config(results.get("config") or {}))
  return {name: json.dumps(value, sort_keys=True) for name, value in flat.items()}


def _label_noise(results: dict) -> float:
  return float((results.get("config") or {}).get("label_noise") or 0.0)


def _run_row(path: epath.Path, results: dict) -> dict:
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
      "run_dir": str(path.parent),
      "config": _run_config(results),
      "provenance": provenance.provenance_items(results.get("provenance")),
  }


def _pooled_differences(runs: pd.DataFrame) -> list[str]:
  """Config fields (outside `_PER_RUN_FIELDS`) that differ between runs pooled as seeds."""
  fields = set()
  for _, group in runs.groupby(keys(runs) + ["method"]):
    configs = list(group["config"])
    names = set().union(*configs) - _PER_RUN_FIELDS
    fields |= {n for n in names if len({c.get(n) for c in configs}) > 1}
  return sorted(fields)


def load_runs(results_dir: epath.PathLike) -> pd.DataFrame:
  """One row per `results.json` under `results_dir` (unreadable files are skipped with a
  warning): dataset, model, method, seed, train_examples (-1 when unknown), test_accuracy,
  train_accuracy, total_epochs, wall_time_s, train_flops (NaN when not reported), label_noise
  (0 when not set), run_dir, config (flattened, values as JSON text).

  Warns when runs that will be pooled as the seeds of one combination and method differ in
  their config beyond the seed, or repeat a seed."""
  rows = []
  for path in _find(results_dir, RESULTS_FILE):
    try:
      rows.append(_run_row(path, json.loads(path.read_text())))
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


def _analysis_row(path: epath.Path, analysis: dict, run_keys: dict) -> dict:
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
  row["run_dir"] = str(path.parent)
  return row


def load_analyses(results_dir: epath.PathLike) -> pd.DataFrame:
  """One row per `analysis.json` under `results_dir`, keyed like the runs (from the run's
  results.json when present, else from the analysis' own `run` record)."""
  rows = []
  for path in _find(results_dir, ANALYSIS_FILE):
    try:
      analysis = json.loads(path.read_text())
      results_path = path.parent / RESULTS_FILE
      if results_path.exists():
        source = json.loads(results_path.read_text())
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
