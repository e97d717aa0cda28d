r"""Analyses of a finished run: `python -m launch.analyze --workdir=RUN`.

Example (after `python -m launch.main --config=configs/digits.py:method=lw --workdir=runs/lw`):

  python -m launch.analyze --workdir=runs/lw --noise_scales=0.001,0.01,0.1 --draws=5

Loads the run (`reinit.train.load_run`: config, model, variables at init and at the end) and
writes RUN/analysis.json with (all in eval mode, float32):

  margins       per-example margins on the training subset (w.r.t. the labels trained on) and
                the test split: statistics, and on the training subset normalized by the
                product of spectral norms
  norms         per conv/dense layer (BN folded in) and active standardization: Frobenius and
                spectral norms; their sum and product; the same totals at initialization
  flatness      training-loss increase under relative Gaussian weight noise per noise scale
                (`--noise_scales`, `--draws`), over the first `--batches` training batches
  hessian       top Hessian eigenvalue of that training loss w.r.t. the params
                (at most `--hessian_iterations`, stopping once the estimate's relative change
                is below `--hessian_tolerance`)
  hessian_folded  the same w.r.t. the BN-folded parameters (each BatchNorm folded into its
                conv/dense): invariant to rescaling a kernel followed by BatchNorm
  robustness    test accuracy with each unit in turn reset to its values at initialization
                (the run's stage-0 init: for LW, not the fresh draw a unit last restarted from)
  memorization  when the run trained with `label_noise > 0` and the training batches carry
                `true_label` and `corrupted`: fit of corrupted vs clean examples

See `reinit/analysis/` for the definitions. `launch.report` tabulates analysis.json files.
A bad flag value prints one line naming the flag and the accepted values and exits with 2.
"""

import sys

from absl import app
from absl import flags

from launch import analysis_run
from launch import common
from launch.analysis_run import ANALYSES
from launch.analysis_run import DEFAULTS

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a finished run (has results.json).")
_NOISE_SCALES = flags.DEFINE_list("noise_scales", [str(s) for s in DEFAULTS["noise_scales"]],
                                  "Relative weight-noise scales sigma of the flatness analysis.")
_DRAWS = flags.DEFINE_integer("draws", DEFAULTS["draws"], "Noise draws per noise scale.")
_BATCHES = flags.DEFINE_integer("batches", DEFAULTS["batches"],
                                "Training batches (eval batch size) of the flatness and Hessian "
                                "analyses; margins use every example.")
_POWER_ITERATIONS = flags.DEFINE_integer("power_iterations", DEFAULTS["power_iterations"],
                                         "Power iterations per conv spectral norm.")
_HESSIAN_ITERATIONS = flags.DEFINE_integer("hessian_iterations", DEFAULTS["hessian_iterations"],
                                           "Power iterations of the top Hessian eigenvalue "
                                           "(at most).")
_HESSIAN_TOLERANCE = flags.DEFINE_float(
    "hessian_tolerance", DEFAULTS["hessian_tolerance"], "Stop the Hessian power iteration "
    "once the eigenvalue's relative change is below this; 0: run all iterations.",
    lower_bound=0.0)
_ANALYSES = flags.DEFINE_list("analyses", list(ANALYSES), "Which analyses to run.")
_SEED = flags.DEFINE_integer("seed", DEFAULTS["seed"],
                             "Seed of the noise draws and power-iteration starts.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir, if not the run's own.")
flags.mark_flags_as_required(["workdir"])


# ---------------------------------------------------------------- flag checks


def _noise_scales(values: list[str]) -> list[float]:
  try:
    scales = [float(v) for v in values]
  except ValueError:
    scales = []
  if not scales or any(not s >= 0 for s in scales):
    common.fail(f"--noise_scales={','.join(values)} is invalid; accepted: comma-separated "
                "non-negative numbers, e.g. 0.001,0.01,0.1")
  return scales


def _check_flags() -> tuple[list[float], list[str]]:
  """Validated (noise scales, analyses); a bad value exits with one line."""
  for flag in (_DRAWS, _BATCHES, _POWER_ITERATIONS, _HESSIAN_ITERATIONS):
    if flag.value < 1:
      common.fail(f"--{flag.name}={flag.value} is invalid; accepted: a positive integer")
  unknown = [a for a in _ANALYSES.value if a not in ANALYSES]
  if unknown or not _ANALYSES.value:
    common.fail(f"--analyses={','.join(_ANALYSES.value)} is invalid; accepted: a "
                f"comma-separated subset of {','.join(ANALYSES)}")
  return _noise_scales(_NOISE_SCALES.value), list(_ANALYSES.value)


def analyze_from_flags(workdir: str) -> tuple[dict, str]:
  """`analyze_workdir` with this module's flags."""
  noise_scales, analyses = _check_flags()
  return analysis_run.analyze_workdir(workdir, noise_scales=noise_scales, analyses=analyses,
                                      draws=_DRAWS.value, batches=_BATCHES.value,
                                      power_iterations=_POWER_ITERATIONS.value,
                                      hessian_iterations=_HESSIAN_ITERATIONS.value,
                                      hessian_tolerance=_HESSIAN_TOLERANCE.value,
                                      seed=_SEED.value, data_dir=_DATA_DIR.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from reinit import train  # pylint: disable=g-import-not-at-top
  try:
    result, path = analyze_from_flags(_WORKDIR.value)
  except train.ConfigError as e:
    common.fail(str(e))
  print(analysis_run.summary(result))
  print(f"-> {path}")


if __name__ == "__main__":
  sys.exit(common.run_app(main))
