"""The report's figures (matplotlib, Agg, no display), written as PNGs through `etils.epath`:
gain over baseline vs training-set size, accuracy per dataset, accuracy vs training compute."""

import math
from typing import Sequence

from etils import epath
import numpy as np
import pandas as pd

from reinit.report import stats
from reinit.report.runs import EXTRA_KEYS, keys, method_order
from reinit.report.tables import seed_means, size_text


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


def _save(fig, path: epath.PathLike) -> str:
  # Through a file object: savefig's own writing knows only local paths.
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  return str(path)


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
                   "sem": stats.standard_error(values), "pairs": int(values.size)})
  return pd.DataFrame(rows, columns=["method", "train_examples", "gain", "sem", "pairs"])


def plot_gain_vs_size(runs: pd.DataFrame, path: epath.PathLike) -> str | None:
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
  parts = [key["model"], f"{size_text(key['train_examples'])} training examples"]
  parts += [f"{k.replace('_', ' ')} {v:g}" for k, v in key.items() if k in EXTRA_KEYS]
  return ", ".join(parts)


def plot_per_dataset(runs: pd.DataFrame, path: epath.PathLike) -> str:
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


def plot_compute_vs_accuracy(runs: pd.DataFrame, path: epath.PathLike) -> str:
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
      grouped["test_accuracy"].agg(stats.standard_error).rename("sem")).reset_index()
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
                  yerr=100 * np.nan_to_num(stats.standard_error(p["test_accuracy"])),
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
