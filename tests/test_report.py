"""Tests of the report: Holm and the binomial test against hand-computed values, Tables 2 and 3
on a synthetic tree of results.json files with known numbers, the analysis table, the figures
and the command line."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from launch import report as cli
from reinit import report

REPO = pathlib.Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ statistics


@pytest.mark.parametrize("p, adjusted", [
    ([0.01, 0.04, 0.03], [0.03, 0.06, 0.06]),  # 3 * .01; 2 * .03; max(1 * .04, .06)
    ([0.04, 0.01], [0.04, 0.02]),              # 2 * .01 first; then max(.04, .02)
    ([0.6, 0.7], [1.0, 1.0]),                  # capped at 1, then kept monotone
    ([0.005, 0.011, 0.02, 0.04, 0.13], [0.025, 0.044, 0.06, 0.08, 0.13]),
    ([0.3], [0.3]),
    ([], []),
])
def test_holm_by_hand(p, adjusted):
  np.testing.assert_allclose(report.holm(p), adjusted, rtol=1e-12)


def test_sign_test_known_values():
  assert report.sign_test(9, 1) == pytest.approx(0.021484375, rel=1e-12)  # 2 * 11 / 1024
  assert report.sign_test(1, 9) == pytest.approx(0.021484375, rel=1e-12)
  assert report.sign_test(3, 0) == pytest.approx(0.25)                     # 2 / 8
  assert report.sign_test(5, 5) == 1.0
  assert report.sign_test(0, 0) == 1.0
  for wins, losses in [(12, 3), (7, 2), (20, 14)]:
    assert report.sign_test(wins, losses) == pytest.approx(
        stats.binomtest(wins, wins + losses, 0.5).pvalue)


def test_compare_counts_ties_and_skips_missing():
  out = report.compare([0.9, 0.8, 0.7, np.nan], [0.8, 0.8, 0.75, 0.5])
  assert (out["combos"], out["wins"], out["losses"], out["ties"]) == (3, 1, 1, 1)
  assert out["p_value"] == 1.0
  assert out["mean_gain"] == pytest.approx((0.1 + 0.0 - 0.05) / 3)


def test_standard_error():
  assert report.standard_error([0.80, 0.82, 0.84]) == pytest.approx(0.02 / math.sqrt(3))
  assert math.isnan(report.standard_error([0.5]))


# ------------------------------------------------------------------ a synthetic results tree

# (dataset, model, train_examples) -> method -> test accuracy per seed
ACCURACIES = {
    ("digits", "simple_cnn", 200): {"baseline": [0.80, 0.82, 0.84], "lw": [0.86, 0.88, 0.90],
                                    "baseline_long": [0.83]},
    ("cifar10", "resnet18", 1000): {"baseline": [0.60, 0.62], "lw": [0.65, 0.66],
                                    "baseline_long": [0.61, 0.63]},
    ("cifar10", "resnet18", 5000): {"baseline": [0.90, 0.92], "lw": [0.90, 0.92]},
}
EPOCHS = {"baseline": 30, "baseline_long": 210, "lw": 210}


def _write_run(root, dataset, model, size, method, seed, accuracy, config=None, **extra):
  config = {"dataset": dataset, "seed": seed, **(config or {})}
  run_dir = os.path.join(root, f"{dataset}_{model}_{size}_{config.get('label_noise', 0)}",
                         f"{method}_s{seed}")
  os.makedirs(run_dir)
  results = {"dataset": dataset, "model": model, "method": method, "seed": seed,
             "train_examples": size, "test_accuracy": accuracy, "train_accuracy": 1.0,
             "total_epochs": EPOCHS[method], "wall_time_s": 10.0, "stages": [],
             "config": config, **extra}
  with open(os.path.join(run_dir, "results.json"), "w") as f:
    json.dump(results, f)
  return run_dir


def _analysis(margin, sum_frobenius, increases, eigenvalue, folded_eigenvalue=None):
  """An analysis.json; without `folded_eigenvalue`, one written before `hessian_folded`."""
  out = {"margins": {"train": {"median": margin}, "train_normalized": {"median": margin / 100}},
         "norms": {"log10_product_spectral": 2.0, "sum_frobenius": sum_frobenius,
                   "sum_frobenius_folded": sum_frobenius / 10},
         "flatness": {"noise_scales": [0.01, 0.1], "mean": increases},
         "hessian": {"eigenvalue": eigenvalue}, "memorization": None}
  if folded_eigenvalue is not None:
    out["hessian_folded"] = {"eigenvalue": folded_eigenvalue}
  return out


@pytest.fixture(scope="module")
def results_tree(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("runs"))
  for (dataset, model, size), methods in ACCURACIES.items():
    for method, accuracies in methods.items():
      for seed, accuracy in enumerate(accuracies):
        extra = {"compute": {"train_flops": 1e12}} if method == "lw" and seed == 0 else {}
        run_dir = _write_run(root, dataset, model, size, method, seed, accuracy, **extra)
        if dataset == "digits" and method in ("baseline", "lw") and seed < 2:
          margin = {"baseline": 2.0, "lw": 5.0}[method] + seed  # means 2.5 and 5.5
          with open(os.path.join(run_dir, "analysis.json"), "w") as f:
            folded = 3.0 + seed if method == "lw" else None  # baseline: older files
            json.dump(_analysis(margin, 50.0 + seed, [0.01 * (seed + 1), 0.5], 100.0, folded),
                      f)
  broken = os.path.join(root, "broken")
  os.makedirs(broken)
  with open(os.path.join(broken, "results.json"), "w") as f:
    f.write("{not json")
  return root


@pytest.fixture(scope="module")
def built(results_tree, tmp_path_factory):
  return cli.build_report(results_tree, str(tmp_path_factory.mktemp("report")))


def test_runs_are_read_and_broken_files_skipped(built):
  runs = built["runs"]
  assert len(runs) == sum(len(a) for m in ACCURACIES.values() for a in m.values())
  assert runs["train_flops"].notna().sum() == 3  # the lw seed-0 runs; NaN elsewhere


def test_table2_means_sems_and_counts(built):
  table = built["table2"].set_index(report.KEYS)
  assert list(table.columns[:3]) == ["baseline_mean", "baseline_sem", "baseline_n"]
  methods = [c[:-5] for c in table.columns if c.endswith("_mean")]
  assert methods == ["baseline", "baseline_long", "lw"]
  for key, by_method in ACCURACIES.items():
    for method, accuracies in by_method.items():
      row = table.loc[key]
      assert row[f"{method}_mean"] == pytest.approx(np.mean(accuracies))
      assert row[f"{method}_n"] == len(accuracies)
      if len(accuracies) > 1:
        expected = np.std(accuracies, ddof=1) / np.sqrt(len(accuracies))
        assert row[f"{method}_sem"] == pytest.approx(expected)
      else:
        assert np.isnan(row[f"{method}_sem"])
  assert np.isnan(table.loc[("cifar10", "resnet18", 5000), "baseline_long_mean"])


def test_table2_markdown_bolds_the_best_mean(built):
  lines = {line.split(" | ")[0].strip("| ") + line.split(" | ")[2]: line
           for line in built["markdown"]["table2"].splitlines() if line.startswith("| ")}
  digits = lines["digits200"]
  sem = 100 * 0.02 / math.sqrt(3)
  assert f"| 82.00 ± {sem:.2f} |" in digits  # baseline, not bold
  assert "| 83.00 |" in digits              # one seed: no ±
  assert f"**88.00 ± {sem:.2f}**" in digits  # lw, the best
  tie = lines["cifar105000"]
  assert tie.count("**91.00 ± 1.00**") == 2  # a tie for best: both bold
  assert "–" in tie                          # baseline_long missing there
  with open(built["files"]["table2.md"]) as f:
    assert built["markdown"]["table2"] in f.read()


def test_table3_wins_losses_ties_and_holm(built):
  table = built["table3"].set_index(["reference", "method"])
  lw = table.loc[("baseline", "lw")]
  assert (lw.combos, lw.wins, lw.losses, lw.ties) == (3, 2, 0, 1)
  assert lw.p_value == pytest.approx(0.5)
  long_vs_base = table.loc[("baseline", "baseline_long")]
  assert (long_vs_base.combos, long_vs_base.wins, long_vs_base.losses) == (2, 2, 0)
  assert lw.p_holm == pytest.approx(1.0) and long_vs_base.p_holm == pytest.approx(1.0)
  lw_long = table.loc[("baseline_long", "lw")]
  assert (lw_long.combos, lw_long.wins, lw_long.p_holm) == (2, 2, pytest.approx(0.5))
  assert ("baseline_long", "baseline") not in table.index
  assert lw.mean_gain == pytest.approx(((0.88 - 0.82) + (0.655 - 0.61) + 0.0) / 3)


def test_table3_nine_wins_one_loss(tmp_path):
  for i in range(10):
    size = 100 * (i + 1)
    _write_run(tmp_path, "digits", "simple_cnn", size, "baseline", 0, 0.5)
    _write_run(tmp_path, "digits", "simple_cnn", size, "lw", 0, 0.6 if i < 9 else 0.4)
    _write_run(tmp_path, "digits", "simple_cnn", size, "baseline_long", 0,
               0.55 if i % 2 else 0.45)
  runs = report.load_runs(str(tmp_path))
  table = report.table3(runs).set_index(["reference", "method"])
  lw = table.loc[("baseline", "lw")]
  assert (lw.wins, lw.losses, lw.ties) == (9, 1, 0)
  assert lw.p_value == pytest.approx(0.021484375, rel=1e-12)
  # Holm over {lw: 0.0215, baseline_long: 1.0}: 2 * 0.0215, then max(1.0, 0.043).
  assert lw.p_holm == pytest.approx(2 * 0.021484375) and lw.significant
  assert table.loc[("baseline", "baseline_long")].p_holm == 1.0


def test_analysis_table_means_over_seeds(built):
  table = built["analysis"].set_index(report.KEYS + ["method"])
  lw = table.loc[("digits", "simple_cnn", 200, "lw")]
  assert lw["runs"] == 2 and lw["median_margin"] == pytest.approx(5.5)
  assert table.loc[("digits", "simple_cnn", 200, "baseline"), "median_margin"] == 2.5
  assert lw["sum_frobenius"] == pytest.approx(50.5)
  assert lw["loss_increase@0.01"] == pytest.approx(0.015)
  assert "median normalized margin" in built["markdown"]["analysis"]
  assert "memorized" not in built["markdown"]["analysis"]  # no label-noise run: column dropped
  assert lw["sum_frobenius_folded"] == pytest.approx(5.05)
  assert lw["hessian_folded_top_eigenvalue"] == pytest.approx(3.5)
  baseline = table.loc[("digits", "simple_cnn", 200, "baseline")]
  assert np.isnan(baseline["hessian_folded_top_eigenvalue"])  # an analysis.json without it


def test_analysis_markdown_leads_with_the_bn_folded_measures_and_says_what_is_invariant(built):
  lines = built["markdown"]["analysis"].splitlines()
  header = next(l for l in lines if l.startswith("| dataset"))
  columns = [c.strip() for c in header.strip("|").split("|")]
  # The primary norm is the BN-folded one; the raw Σ‖W‖_F is a labelled secondary column.
  assert columns.index("Σ‖W̃‖_F (BN-folded)") < columns.index("Σ‖W‖_F (raw kernels)")
  assert (columns.index("top Hessian eigenvalue (BN-folded)")
          < columns.index("top Hessian eigenvalue (raw params)"))
  lw_row = next(l for l in lines if "| lw |" in l)
  cells = [c.strip() for c in lw_row.strip("|").split("|")]
  assert cells[columns.index("Σ‖W̃‖_F (BN-folded)")] == "5.05"
  assert cells[columns.index("Σ‖W‖_F (raw kernels)")] == "50.5"
  baseline_row = next(l for l in lines if "| baseline |" in l)
  cells = [c.strip() for c in baseline_row.strip("|").split("|")]
  assert cells[columns.index("top Hessian eigenvalue (BN-folded)")] == "–"
  legend = lines[-1]  # the legend is under the table
  assert legend.startswith("Invariance.") and "BN-folded top Hessian eigenvalue" in legend
  assert "Σ‖W‖_F (that kernel's term × c)" in legend and "1/c²" in legend


def test_figures_are_written(built):
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  for name in ("gain_vs_size.png", "per_dataset.png", "compute_vs_accuracy.png"):
    path = built["files"][name]
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 300 and width > 500


def test_gains_by_size(built):
  gains = report.gains_by_size(built["runs"]).set_index(["method", "train_examples"])
  assert gains.loc[("lw", 200), "gain"] == pytest.approx(0.06)
  assert gains.loc[("lw", 5000), "gain"] == pytest.approx(0.0)
  assert gains.loc[("baseline_long", 1000), "gain"] == pytest.approx(0.01)


def test_label_noise_runs_are_their_own_combinations(tmp_path, capsys):
  for noise, accuracies in ((0.0, (0.9, 0.8)), (0.2, (0.7, 0.6))):
    for seed in range(2):
      for method, accuracy in zip(("baseline", "lw"), accuracies):
        _write_run(tmp_path, "digits", "simple_cnn", 200, method, seed, accuracy + 0.01 * seed,
                   config={"label_noise": noise, "lw": {"rescale": True}})
  built = cli.build_report(str(tmp_path))
  assert "differ in config" not in capsys.readouterr().err
  table = built["table2"].set_index(report.KEYS + ["label_noise"])
  assert table.loc[("digits", "simple_cnn", 200, 0.2), "lw_mean"] == pytest.approx(0.605)
  assert table.loc[("digits", "simple_cnn", 200, 0.0), "baseline_n"] == 2
  assert "| label noise |" in built["markdown"]["table2"]
  assert built["table3"].set_index("method").loc["lw", "combos"] == 2
  assert "per_dataset.png" in built["files"]

  _write_run(tmp_path / "more", "digits", "simple_cnn", 200, "lw", 5, 0.5,
             config={"label_noise": 0.2, "lw": {"rescale": False}})
  report.load_runs(str(tmp_path))
  err = capsys.readouterr().err
  assert "differ in config fields lw.rescale" in err


def test_runs_recorded_before_a_config_field_existed_pool_with_runs_at_its_old_value(
    tmp_path, capsys):
  """A run written before `sp.reset_batch_stats` existed (every method's config has the `sp`
  section) did what False does: it pools with runs that record False, silently, and is told
  apart from runs that record True."""
  for seed in range(2):
    _write_run(tmp_path, "digits", "simple_cnn", 200, "lw", seed, 0.9,
               config={"sp": {"shrink": 0.4}} if seed == 0 else
               {"sp": {"shrink": 0.4, "reset_batch_stats": False}})
  report.load_runs(str(tmp_path))
  assert "differ in config" not in capsys.readouterr().err
  _write_run(tmp_path / "more", "digits", "simple_cnn", 200, "lw", 5, 0.1,
             config={"sp": {"shrink": 0.4, "reset_batch_stats": True}})
  report.load_runs(str(tmp_path))
  assert "differ in config fields sp.reset_batch_stats" in capsys.readouterr().err


# ------------------------------------------------------------------ command line


def test_cli_prints_tables_and_figures(results_tree, tmp_path, capsys):
  assert cli.main([results_tree, "--out", str(tmp_path / "out")]) == 0
  out = capsys.readouterr()
  assert "## Table 2" in out.out and "## Table 3" in out.out
  assert out.out.count("figure: ") == 3
  assert "warning: skipped" in out.err and "broken" in out.err
  assert (tmp_path / "out" / "table3.csv").exists()


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main([str(tmp_path / "missing")])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: DIR=") and "accepted" in err[0]
  assert cli.main([str(tmp_path)]) == 2  # a directory without results
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no readable results.json" in err[0]
  with pytest.raises(SystemExit) as exit_info:
    cli.main([str(tmp_path), "--bogus"])
  assert exit_info.value.code == 2
  assert len(capsys.readouterr().err.strip().splitlines()) == 1


def _provenance(jax_version, commit="a" * 40, dirty=False, count=8, kind="TPU v4"):
  return {"python": "3.11.7",
          "packages": {"jax": jax_version, "jaxlib": jax_version, "flax": "0.12.8",
                       "tensorflow": None, "reinit": "0.1.0"},
          "code": None if commit is None else {"commit": commit, "dirty": dirty},
          "devices": {"platform": "tpu", "kind": kind, "count": count, "local_count": 4,
                      "process_count": 2},
          "xla_flags": ""}


def test_tables_name_the_versions_and_devices_they_were_made_with(tmp_path):
  _write_run(tmp_path, "digits", "simple_cnn", 100, "baseline", 0, 0.5,
             provenance=_provenance("0.10.2"))
  _write_run(tmp_path, "digits", "simple_cnn", 100, "baseline", 1, 0.6,
             provenance=_provenance("0.10.2", dirty=True))
  _write_run(tmp_path, "digits", "simple_cnn", 100, "lw", 0, 0.7,
             provenance=_provenance("0.9.0", commit=None))
  _write_run(tmp_path, "digits", "simple_cnn", 100, "lw", 1, 0.7)  # written before provenance
  built = cli.build_report(str(tmp_path))
  for name in ("table2", "table3"):
    with open(os.path.join(str(tmp_path), "report", f"{name}.md")) as f:
      footer = f.read().strip().splitlines()[-1]
    assert footer == built["markdown"][name].splitlines()[-1]
    assert footer.startswith("Made with (4 runs): python 3.11.7 (3 runs), not recorded (1 run);")
    assert "jax 0.10.2 (2 runs), 0.9.0 (1 run), not recorded (1 run);" in footer
    assert "flax 0.12.8 (3 runs)" in footer
    assert "devices 8 × TPU v4, 2 processes (3 runs)" in footer
    assert ("code aaaaaaaaaaaa (1 run), aaaaaaaaaaaa (dirty tree) (1 run), not a git checkout "
            "(1 run), not recorded (1 run)") in footer
    assert "XLA_FLAGS (none) (3 runs)" in footer
    assert "tensorflow " not in footer and "reinit" not in footer  # not installed; the commit
    assert footer.endswith("provenance not recorded by 1 of 4 runs.")


def test_footer_of_runs_that_agree_lists_each_value_once(tmp_path):
  for seed in range(3):
    _write_run(tmp_path, "digits", "simple_cnn", 100, "baseline", seed, 0.5,
               provenance=_provenance("0.10.2", count=1, kind="cpu"))
  footer = cli.build_report(str(tmp_path))["markdown"]["table2"].splitlines()[-1]
  assert footer == ("Made with (3 runs): python 3.11.7; jax 0.10.2; jaxlib 0.10.2; flax 0.12.8; "
                    "devices 1 × cpu, 2 processes; code aaaaaaaaaaaa; XLA_FLAGS (none).")


# What the subprocess runs: gs:// served from memory by fsspec (etils' fsspec backend; TF's gfile,
# which epath prefers for gs:// when TensorFlow is installed, is switched off by EPATH_USE_TF=0),
# the same runs written there and to a local directory, and the report built from both.
_GS_IN_MEMORY = r"""
import json, os, sys
import fsspec
from fsspec.implementations.memory import MemoryFileSystem
from etils import epath

class InMemoryGcs(MemoryFileSystem):
  protocol = ("gs", "gcs")

fsspec.register_implementation("gs", InMemoryGcs, clobber=True)
fsspec.register_implementation("gcs", InMemoryGcs, clobber=True)
from launch import report as cli

local = sys.argv[1]
for root in (epath.Path("gs://bucket/runs"), epath.Path(local) / "runs"):
  for method, accuracies in (("baseline", (0.5, 0.6)), ("lw", (0.7, 0.9))):
    for seed, accuracy in enumerate(accuracies):
      run_dir = root / f"{method}_{seed}"
      run_dir.mkdir(parents=True, exist_ok=True)
      (run_dir / "results.json").write_text(json.dumps(
          {"dataset": "digits", "model": "simple_cnn", "method": method, "seed": seed,
           "train_examples": 100, "test_accuracy": accuracy, "total_epochs": 30}))
      if seed == 0:
        (run_dir / "analysis.json").write_text(json.dumps({"margins": {"train": {"median": 2.0}}}))
assert cli.main(["gs://bucket/runs", "--out", "gs://bucket/report"]) == 0
cli.build_report(os.path.join(local, "runs"), os.path.join(local, "report"))
names = sorted(name for name in InMemoryGcs.store if "/report/" in name)
texts = {n: (epath.Path("gs://bucket/report") / n).read_text()
         for n in ("table2.md", "table3.md", "analysis.md", "table2.csv")}
png = (epath.Path("gs://bucket/report") / "per_dataset.png").read_bytes()[:8]
print(json.dumps({"names": names, "texts": texts, "png": png.hex()}))
"""


def test_the_report_reads_and_writes_through_a_non_local_epath_backend(tmp_path):
  work = tmp_path / "work"
  work.mkdir()
  proc = subprocess.run(
      [sys.executable, "-c", _GS_IN_MEMORY, str(tmp_path)], cwd=work, capture_output=True,
      text=True, timeout=300,
      env={**os.environ, "EPATH_USE_TF": "0", "PYTHONPATH": str(REPO)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert [n.rsplit("/", 1)[1] for n in got["names"]] == sorted(
      ["runs.csv", "table2.md", "table2.csv", "table3.md", "table3.csv", "analysis.md",
       "analysis.csv", "gain_vs_size.png", "per_dataset.png", "compute_vs_accuracy.png"])
  assert got["png"] == b"\x89PNG\r\n\x1a\n".hex()
  for name, text in got["texts"].items():  # no paths in them: the same as from a local tree
    assert text == (tmp_path / "report" / name).read_text(), name
  assert "| digits | simple_cnn | 100 | 55.00 ± 5.00 | **80.00 ± 10.00** |" in got["texts"][
      "table2.md"]
  assert not any(work.iterdir())  # nothing written locally under a path named gs:


# ------------------------------------------------------------------ grouped vs single: within noise


def test_within_noise_bound_is_two_combined_standard_errors_plus_half_a_point():
  from reinit.report import stats as stats_lib  # pylint: disable=g-import-not-at-top
  a, b = [0.90, 0.92, 0.94], [0.88, 0.89, 0.90]
  # By hand: se_a = 0.02 / sqrt(3), se_b = 0.01 / sqrt(3).
  bound = 2 * math.sqrt(0.02 ** 2 / 3 + 0.01 ** 2 / 3) + 0.005
  out = stats_lib.within_noise(a, b)
  assert out["bound"] == pytest.approx(bound, rel=1e-12)
  assert out["difference"] == pytest.approx(0.03, rel=1e-12)
  assert out["agree"] == (0.03 <= bound)  # 0.03 <= 0.0308...: agree
  assert out["agree"]
  assert not stats_lib.within_noise(a, [0.85, 0.86, 0.87])["agree"]  # 0.06 apart
  # One seed a side: its standard error counts as 0, the bound is the slack (plus the other's).
  assert stats_lib.within_noise([0.90], [0.904])["agree"]
  assert not stats_lib.within_noise([0.90], [0.906])["agree"]


def _write_accuracy(root, name, method, seed, accuracy):
  path = root / name
  path.mkdir(parents=True)
  (path / "results.json").write_text(json.dumps({
      "dataset": "digits", "model": "simple_cnn", "method": method, "seed": seed,
      "train_examples": 100, "test_accuracy": accuracy}))


def test_compare_studies_flags_the_method_that_moved(tmp_path, capsys):
  from launch import compare_studies  # pylint: disable=g-import-not-at-top
  grouped, single = tmp_path / "grouped", tmp_path / "single"
  for seed, (lw, base) in enumerate([(0.90, 0.80), (0.91, 0.81), (0.92, 0.82)]):
    _write_accuracy(grouped, f"lw{seed}", "lw", seed, lw)
    _write_accuracy(single, f"lw{seed}", "lw", seed, lw + 0.004)  # within the 0.5 point slack
    _write_accuracy(grouped, f"b{seed}", "baseline", seed, base)
    _write_accuracy(single, f"b{seed}", "baseline", seed, base + 0.05)  # 5 points off
  assert compare_studies.main([str(grouped), str(single)]) == 1
  out = capsys.readouterr().out
  assert "| lw | 3 / 3 |" in out and "| yes |" in out
  assert "| baseline | 3 / 3 |" in out and "| NO |" in out
  assert "1 of 2 agree within noise" in out
  with pytest.raises(SystemExit) as exit_info:
    compare_studies.main([str(grouped), str(tmp_path / "empty")])
  assert exit_info.value.code == 2
