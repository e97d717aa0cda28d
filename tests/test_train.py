"""Tests of methods and the trainer: LW's switch against its definition, end-to-end runs on
digits, determinism, no recompilation across stages, and one-line user errors from the CLI."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reinit
from configs import digits as digits_config
from reinit import methods
from reinit import workdir as workdir_lib
from reinit.models import get_model, Standardize

REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ LW's switch


@pytest.fixture(scope="module")
def lw_setup():
  model = get_model("simple_cnn", num_classes=10, width=0.25)
  x = jax.random.normal(jax.random.key(9), (16, 8, 8, 1))
  init = model.init(jax.random.key(0), x)
  units = reinit.layer_order(model, jax.random.key(0), x)
  # "Trained": every leaf moved away from init (BN biases too, so they have nonzero values).
  noise = jax.tree.map(lambda p: jax.random.normal(jax.random.key(5), p.shape), init["params"])
  trained = {**init, "params": jax.tree.map(lambda p, n: 2.0 * p + 0.3 * n, init["params"],
                                            noise)}
  trained["batch_stats"] = jax.tree.map(lambda s: s + 0.7, init["batch_stats"])
  fresh = model.init(jax.random.key(1), x)
  return model, x, init, units, trained, fresh


@pytest.mark.parametrize("k", [1, 3, 6])
def test_lw_switch_matches_definition(lw_setup, k):
  model, x, init, units, trained, fresh = lw_setup
  memory = {"init_norms": methods.init_norms(init)}
  switch = jax.jit(lambda v, f, m: methods.lw_transform(k, v, f, m, units=units))
  out = switch(trained, fresh, memory)
  for path, new, old, fr, ini in zip(reinit.paths(out), jax.tree.leaves(out),
                                     jax.tree.leaves(trained), jax.tree.leaves(fresh),
                                     jax.tree.leaves(init)):
    collection, unit = path.split("/")[:2]
    kept = units.index(unit) < k
    if collection == "norm":
      if path.endswith("active"):
        assert float(new) == 0.0, path  # all off until calibration
      continue
    if not kept:  # params and batch_stats of units[k:]: exactly the fresh draw
      np.testing.assert_array_equal(new, fr, err_msg=path)
    elif collection == "batch_stats":
      # Follows the block's conv kernel, rescaled by s: running mean x s, variance x s^2.
      s = (np.linalg.norm(init["params"][unit]["Conv_0"]["kernel"])
           / np.linalg.norm(trained["params"][unit]["Conv_0"]["kernel"]))
      np.testing.assert_allclose(new, np.asarray(old) * (s if path.endswith("mean") else s * s),
                                 rtol=1e-5, err_msg=path)
    elif np.linalg.norm(ini) <= 1e-6:  # zero-initialized (BN bias): rescaled to zero
      np.testing.assert_array_equal(new, np.zeros_like(old), err_msg=path)
    else:  # kept: rescaled to exactly its norm at init, same direction
      np.testing.assert_allclose(np.linalg.norm(new), np.linalg.norm(ini), rtol=1e-5,
                                 err_msg=path)
      np.testing.assert_allclose(np.asarray(new) * np.linalg.norm(old) / np.linalg.norm(new),
                                 old, rtol=1e-4, atol=1e-5, err_msg=path)

  calibrated = methods.calibrate_standardization(model.apply, out, [x[:8], x[8:]], units[k - 1])
  for unit in units[:-1]:
    standardize = calibrated["norm"][unit]["Standardize_0"]
    assert float(standardize["active"]) == (1.0 if unit == units[k - 1] else 0.0), unit
  # The statistics are those of the unit's output in training mode, over both batches.
  outputs = []
  for batch in (x[:8], x[8:]):
    _, captured = model.apply(out, batch, train=True, mutable=["batch_stats", "intermediates"],
                              capture_intermediates=lambda m, _: isinstance(m, Standardize))
    outputs.append(np.asarray(
        captured["intermediates"][units[k - 1]]["Standardize_0"]["__call__"][0]))
  channels = outputs[0].shape[-1]
  stacked = np.concatenate([o.reshape(-1, channels) for o in outputs])
  standardize = calibrated["norm"][units[k - 1]]["Standardize_0"]
  np.testing.assert_allclose(standardize["mean"], stacked.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(standardize["var"], stacked.var(0), rtol=1e-3, atol=1e-5)
  # Switched on, it maps that output to (x - mean) / sqrt(var + eps).
  _, captured = model.apply(calibrated, x[:8], train=True,
                            mutable=["batch_stats", "intermediates"],
                            capture_intermediates=lambda m, _: isinstance(m, Standardize))
  on = np.asarray(captured["intermediates"][units[k - 1]]["Standardize_0"]["__call__"][0])
  expected = (outputs[0] - np.asarray(standardize["mean"])) / np.sqrt(
      np.asarray(standardize["var"]) + 1e-5)
  np.testing.assert_allclose(on, expected, rtol=1e-4, atol=1e-4)


def test_plans_stage_counts():
  config = digits_config.get_config()
  units = [f"block{i}" for i in range(6)] + ["head"]
  config.method = "lw"
  assert methods.make_plan(config, units).num_stages == 7
  config.num_stages = 3
  lw = methods.make_plan(config, units)
  assert lw.num_stages == 3 and lw.calibrated_unit(2) == "block1"
  config.method = "baseline_long"
  long = methods.make_plan(config, units)
  assert long.epochs == (3 * config.epochs_per_stage,)
  config.method = "lw_nonorm"
  assert methods.make_plan(config, units).calibrated_unit(1) is None
  config.method = "nope"
  with pytest.raises(ValueError, match="accepted: baseline"):
    methods.make_plan(config, units)


# ------------------------------------------------------------------ end to end on digits


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _tiny_config(data_dir, method, **overrides):
  config = digits_config.get_config(f"method={method}")
  config.data_dir = data_dir
  config.width = 0.25
  config.train_examples = 100
  config.batch_size = 32
  config.epochs_per_stage = 2
  config.num_stages = 3
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def lw_run(data_dir, tmp_path_factory):
  from reinit import train
  workdir = str(tmp_path_factory.mktemp("lw"))
  return workdir, train.train_and_evaluate(_tiny_config(data_dir, "lw"), workdir)


def test_lw_run_writes_results(lw_run):
  workdir, results = lw_run
  with open(os.path.join(workdir, "results.json")) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(results))
  for field in ("dataset", "model", "method", "seed", "train_examples", "stages",
                "test_accuracy", "train_accuracy", "wall_time_s", "config"):
    assert field in written, field
  assert written["method"] == "lw" and written["train_examples"] == 100
  assert written["test_examples"] == 500  # every test example counted once
  assert [s["stage"] for s in written["stages"]] == [0, 1, 2]
  assert written["total_epochs"] == 6
  assert written["test_accuracy"] == written["stages"][-1]["test_accuracy"]
  assert written["test_accuracy"] > 0.2  # well above chance (0.1) after 6 epochs
  assert written["config"]["lw"]["rescale"] is True
  # Compute actually spent, from the compiled step's cost analysis.
  compute = written["compute"]
  assert compute["train_steps"] == 3 * 2 * 4  # stages x epochs x ceil(100 / 32)
  assert compute["examples_seen"] == compute["train_steps"] * 32
  assert compute["train_step_flops"] > 0
  assert compute["train_flops"] == compute["train_step_flops"] * compute["train_steps"]
  assert set(written["time_s"]) == {"compile", "train", "eval"}
  assert written["resumed_from"] == []
  # What produced it: versions, the code's commit, devices (conftest forces 8 CPU devices).
  provenance = written["provenance"]
  assert provenance["packages"]["jax"] == jax.__version__
  assert provenance["packages"]["optax"] == optax.__version__
  assert provenance["devices"] == {"platform": "cpu", "kind": "cpu", "count": 8,
                                   "local_count": 8, "process_count": 1}
  assert "--xla_force_host_platform_device_count=8" in provenance["xla_flags"]


def test_runs_are_deterministic(data_dir, lw_run, tmp_path):
  from reinit import train
  _, first = lw_run
  again = train.train_and_evaluate(_tiny_config(data_dir, "lw"), str(tmp_path))
  assert again["stages"] == first["stages"]


@pytest.mark.parametrize("method", ["baseline_long", "dsd"])
def test_compute_matched_methods_spend_what_lw_spent(data_dir, lw_run, tmp_path, method):
  from reinit import train
  _, lw = lw_run
  results = train.train_and_evaluate(_tiny_config(data_dir, method), str(tmp_path))
  # By hand: baseline_long is one stage of LW's 3 x 2 epochs; DSD three phases of 2 epochs.
  assert [s["epochs"] for s in results["stages"]] == ([6] if method == "baseline_long"
                                                      else [2, 2, 2])
  for field in ("total_epochs", "train_steps", "examples_seen"):
    assert results["compute"][field] == lw["compute"][field], field
  # The same network and batch: the same FLOPs per step, plus DSD's masking of gradients and
  # params (two selects per weight, about 1.2% of this tiny network's step).
  if method == "baseline_long":
    assert results["compute"]["train_flops"] == lw["compute"]["train_flops"]
  else:
    assert 1.0 < results["compute"]["train_flops"] / lw["compute"]["train_flops"] < 1.03


# ------------------------------------------------------------------ user errors


@pytest.mark.parametrize("args, words", [
    (["--config=configs/benchmark.py:model=foo"], ["model", "simple_cnn", "resnet18"]),
    (["--config=configs/benchmark.py:method=foo"], ["method", "baseline", "lw"]),
    (["--config=configs/benchmark.py:dataset=no_such_set"], ["no_such_set"]),
    (["--config=configs/digits.py", "--config.train_examples=-5"], ["train_examples", "-1"]),
    (["--config=configs/digits.py", "--config.batch_sise=8"], ["batch_sise", "batch_size"]),
])
def test_cli_user_errors_are_one_line(tmp_path, data_dir, args, words):
  workdir = tmp_path / "run"
  data_flags = [f"--config.data_dir={data_dir}"] if "digits" in args[0] else []
  proc = subprocess.run(
      [sys.executable, "-m", "launch.main", f"--workdir={workdir}", *args, *data_flags],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  for word in words:
    assert word in errors[0], errors[0]
  assert not workdir.exists()  # nothing written


def _tree(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
          for p in sorted(root.rglob("*"))}


def test_foreign_workdir_is_refused_and_left_as_it_was(tmp_path, data_dir):
  # Another tool's run (its results.json, checkpoints) and a scheduler's log; no config.json.
  entries = {"results.json": '{"accuracy": 0.9}', "checkpoints/7/state": "x",
             "slurm-1.out": "log"}
  workdir = tmp_path / "run"
  for name, text in entries.items():
    (workdir / name).parent.mkdir(parents=True, exist_ok=True)
    (workdir / name).write_text(text)
  before = _tree(workdir)
  proc = subprocess.run(
      [sys.executable, "-m", "launch.main", "--config=configs/digits.py",
       f"--config.data_dir={data_dir}", f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert f"workdir={str(workdir)!r}" in errors[0] and "config.json" in errors[0]
  foreign = sorted({name.split("/")[0] for name in entries} - {"slurm-1.out"})
  assert all(name in errors[0] for name in foreign), errors[0]
  assert _tree(workdir) == before  # nothing written


def test_foreign_entries_ignore_hidden_files_and_logs(tmp_path):
  from reinit import train
  assert workdir_lib.foreign_entries(str(tmp_path / "missing")) == []
  for name in (".DS_Store", "slurm-12.out", "run.log", "run.err"):
    (tmp_path / name).write_text("")
  assert workdir_lib.foreign_entries(str(tmp_path)) == []
  (tmp_path / "variables").mkdir()
  (tmp_path / "b.json").write_text("{}")
  (tmp_path / "x.out").mkdir()  # a folder, not a log
  assert workdir_lib.foreign_entries(str(tmp_path)) == ["b.json", "variables", "x.out"]


@pytest.mark.parametrize("policy", ["off", "on", "fold"])
def test_lw_earlier_standardizations(lw_setup, policy):
  model, x, init, units, trained, fresh = lw_setup
  on = jax.tree.map(lambda v: v, trained)
  mean = jnp.linspace(-0.5, 0.5, on["norm"]["block0"]["Standardize_0"]["mean"].shape[0])
  var = jnp.linspace(0.5, 2.0, mean.shape[0])
  on["norm"]["block0"]["Standardize_0"] = {"active": jnp.ones(()), "mean": mean, "var": var}
  out = methods.lw_transform(2, on, fresh, {"init_norms": methods.init_norms(init)}, units=units,
                          rescale=False, earlier_standardizations=policy)
  assert float(out["norm"]["block0"]["Standardize_0"]["active"]) == (1.0 if policy == "on"
                                                                     else 0.0)
  kernel = np.asarray(trained["params"]["block1"]["Conv_0"]["kernel"])
  bn_mean = np.asarray(trained["batch_stats"]["block1"]["BatchNorm_0"]["mean"])
  if policy != "fold":
    np.testing.assert_array_equal(out["params"]["block1"]["Conv_0"]["kernel"], kernel)
    return
  # Folded by hand: W'[h, w, c, o] = W / sqrt(var_c + eps); BN mean + sum W' mean_c.
  sigma = np.sqrt(np.asarray(var) + 1e-5)
  folded = kernel / sigma[None, None, :, None]
  np.testing.assert_allclose(out["params"]["block1"]["Conv_0"]["kernel"], folded, rtol=1e-6)
  shift = (folded * np.asarray(mean)[None, None, :, None]).sum(axis=(0, 1, 2))
  np.testing.assert_allclose(out["batch_stats"]["block1"]["BatchNorm_0"]["mean"],
                             bn_mean + shift, rtol=1e-5, atol=1e-6)
  # block1's conv computes from the raw block0 output what it computed from the standardized
  # one, plus the constant now in the BatchNorm's mean (exact away from the zero-padded borders).
  def block1_conv(variables):
    _, captured = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                              capture_intermediates=lambda m, _: isinstance(m, nn.Conv))
    return np.asarray(captured["intermediates"]["block1"]["Conv_0"]["__call__"][0])
  before = {**on, "params": trained["params"], "batch_stats": trained["batch_stats"]}
  np.testing.assert_allclose(block1_conv(out)[:, 1:-1, 1:-1] - shift,
                             block1_conv(before)[:, 1:-1, 1:-1], rtol=1e-4, atol=1e-4)

