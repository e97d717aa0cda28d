"""Statistics of the report (pure): standard error, Holm, the sign test, method vs reference."""

from typing import Sequence

import numpy as np
from scipy import stats

TIE_TOLERANCE = 1e-12  # seed-mean accuracies closer than this are a tie
ALPHA = 0.05


def standard_error(values: Sequence[float]) -> float:
  """std(ddof=1) / sqrt(n) of `values`; NaN for fewer than two values."""
  values = np.asarray(values, np.float64)
  if values.size < 2:  # scipy would return NaN too, but with a RuntimeWarning
    return float("nan")
  return float(stats.sem(values, ddof=1))


def holm(p_values: Sequence[float]) -> np.ndarray:
  """Holm step-down adjusted p-values, in the input order.

  With p sorted ascending, p_(i) -> max_{j <= i} min(1, (m - j + 1) p_(j)) (1-based j): the
  family-wise error rate is controlled at alpha by rejecting where the adjusted p <= alpha.
  """
  # Hand-written: scipy has only Benjamini-Hochberg (false_discovery_control), and statsmodels'
  # multipletests is not worth a dependency for these five lines.
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
  wins, losses = int(np.sum(diff > TIE_TOLERANCE)), int(np.sum(diff < -TIE_TOLERANCE))
  return {"combos": int(diff.size), "wins": wins, "losses": losses,
          "ties": int(diff.size) - wins - losses, "p_value": sign_test(wins, losses),
          "mean_gain": float(np.mean(diff)) if diff.size else float("nan")}


def within_noise(values: Sequence[float], other: Sequence[float], slack: float = 0.005) -> dict:
  """Whether two sets of seeds of one method agree: |mean - other mean| <= 2 x the combined
  standard error (sqrt(se^2 + se_other^2)) + `slack` (0.005: half a point of accuracy).

  Returns {'mean', 'other_mean', 'difference' (mean - other mean), 'bound', 'agree'}; with
  fewer than two values on a side its standard error counts as 0 (the bound is then `slack`
  plus the other side's share).
  """
  se = [standard_error(v) if len(v) > 1 else 0.0 for v in (values, other)]
  mean, other_mean = float(np.mean(values)), float(np.mean(other))
  bound = 2.0 * float(np.hypot(*se)) + slack
  return {"mean": mean, "other_mean": other_mean, "difference": mean - other_mean,
          "bound": bound, "agree": bool(abs(mean - other_mean) <= bound)}
