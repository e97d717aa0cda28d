"""Analyses of a finished run, end to end: load it, run the analyses, write analysis.json.

`analyze_workdir(workdir, ...)` is what `python -m launch.analyze` and `launch.reproduce` call.
The analyses themselves are pure functions in `reinit.analysis` (margins, flatness, robustness,
memorization); the file and data I/O around them lives here, beside its launchers. This module
imports TensorFlow (through the data pipeline) only when it runs, so `--help` stays fast.
"""

import time

ANALYSES = ("margins", "flatness", "hessian", "hessian_folded", "robustness", "memorization")
DEFAULTS = dict(noise_scales=(0.001, 0.003, 0.01, 0.03, 0.1), draws=5, batches=8,
                power_iterations=100, hessian_iterations=50, hessian_tolerance=1e-4, seed=0)


# ---------------------------------------------------------------- passes over the data


def _predict(logits_fn, variables, dataset, extra_fields=()) -> dict:
  """Margins, predictions, labels (and `extra_fields`) of every real example of `dataset`."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from reinit import analysis  # pylint: disable=g-import-not-at-top
  parts = {k: [] for k in ("margin", "prediction", "label", *extra_fields)}
  for batch in dataset.as_numpy_iterator():
    keep = batch["mask"] > 0
    logits = logits_fn(variables, jnp.asarray(batch["image"]))
    parts["margin"].append(np.asarray(analysis.logit_margins(logits, batch["label"]))[keep])
    parts["prediction"].append(np.asarray(jnp.argmax(logits, -1))[keep])
    for field in ("label", *extra_fields):
      parts[field].append(np.asarray(batch[field])[keep])
  return {k: np.concatenate(v) for k, v in parts.items()}


def _accuracy(logits_fn, variables, dataset) -> float:
  out = _predict(logits_fn, variables, dataset)
  return float((out["prediction"] == out["label"]).mean())


def _first_batches(dataset, count: int) -> list[dict]:
  """The first `count` batches of a padded eval dataset, without their padding examples.

  The losses only count real examples; a Hessian-vector product over the padding of a small
  training set (100 digits in a batch of 256) took 130 ms against 39 ms without it.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  batches = []
  for batch in dataset.take(count).as_numpy_iterator():
    real = batch["mask"] > 0
    if real.any():
      batches.append({k: jnp.asarray(batch[k][real]) for k in ("image", "label", "mask")})
  return batches


# ---------------------------------------------------------------- the analyses


def _norms(model, variables, image, seed, iterations) -> dict:
  from reinit import analysis  # pylint: disable=g-import-not-at-top
  layers = analysis.find_linear_layers(model, variables, image, train=False)
  per_layer = analysis.layer_norms(layers, variables, seed=seed, iterations=iterations)
  return {"layers": per_layer, **analysis.norm_summary(per_layer)}


def load_datasets(data_config):
  """(training subset, test split) as padded eval datasets; data problems are ConfigErrors."""
  from reinit import data as data_lib  # pylint: disable=g-import-not-at-top
  from reinit import train  # pylint: disable=g-import-not-at-top
  try:
    data = data_lib.Data(data_config)
    return data.train_eval(), data.eval(data_config.test_split)
  except ValueError as e:
    raise train.ConfigError(str(e).splitlines()[0]) from e


def analyze(run, model, train_ds, test_ds, *, noise_scales, draws, batches, power_iterations,
            hessian_iterations, analyses, seed, hessian_tolerance=0.0) -> dict:
  """Runs the chosen analyses on a `reinit.workdir.FinishedRun`; returns the analysis.json dict.

  `model` is the run's model (in float32), `train_ds`/`test_ds` padded eval datasets (batches
  of image, label, mask; the training one with `true_label` and `corrupted` under label noise)
  with `as_numpy_iterator()` and `take(n)`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from reinit import analysis  # pylint: disable=g-import-not-at-top
  import reinit  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  final, init = run.final_variables, run.init_variables
  logits_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  key = jax.random.key(seed)
  r = run.results
  out = {"run": {k: r.get(k) for k in ("dataset", "model", "method", "seed", "train_examples",
                                       "test_accuracy", "train_accuracy")},
         "settings": {"noise_scales": noise_scales, "draws": draws, "batches": batches,
                      "power_iterations": power_iterations,
                      "hessian_iterations": hessian_iterations,
                      "hessian_tolerance": hessian_tolerance, "seed": seed,
                      "analyses": analyses}}

  label_noise = float(run.config.get("label_noise", 0) or 0)
  first = next(train_ds.as_numpy_iterator())
  extra = (("true_label", "corrupted") if "memorization" in analyses and label_noise > 0
           and {"true_label", "corrupted"} <= set(first) else ())
  if "margins" in analyses or extra:
    train_pred = _predict(logits_fn, final, train_ds, extra)
  if "margins" in analyses:
    test_pred = _predict(logits_fn, final, test_ds)
    image = jnp.asarray(first["image"][:1])
    norms = _norms(model, final, image, seed, power_iterations)
    init_norms = _norms(model, init, image, seed, power_iterations)
    spectral = [layer["spectral"] for layer in norms["layers"]]
    out["margins"] = {
        "train": analysis.margin_statistics(train_pred["margin"]),
        "test": analysis.margin_statistics(test_pred["margin"]),
        "train_normalized": analysis.margin_statistics(
            analysis.normalize_margins(train_pred["margin"], spectral)),
    }
    out["norms"] = norms
    out["norms_init"] = {k: v for k, v in init_norms.items() if k != "layers"}

  if {"flatness", "hessian", "hessian_folded"} & set(analyses):
    loss_batches = _first_batches(train_ds, batches)
    batch_loss = analysis.classification_loss(model, final)
    examples = int(sum(float(b["mask"].sum()) for b in loss_batches))
  if "flatness" in analyses:
    out["flatness"] = {**analysis.loss_increase(batch_loss, final["params"], loss_batches,
                                                key=jax.random.fold_in(key, 2),
                                                noise_scales=noise_scales, draws=draws),
                       "examples": examples}
  if "hessian" in analyses:
    out["hessian"] = {**analysis.hessian_top_eigenvalue(batch_loss, final["params"],
                                                        loss_batches,
                                                        key=jax.random.fold_in(key, 3),
                                                        iterations=hessian_iterations,
                                                        tolerance=hessian_tolerance),
                      "examples": examples}
  if "hessian_folded" in analyses:
    # Invariant to how each layer's scale is split between its kernel and its BatchNorm.
    layers = analysis.find_linear_layers(model, final, jnp.asarray(first["image"][:1]),
                                         train=False)
    folded_loss, theta = analysis.folded_classification_loss(model, final, layers)
    out["hessian_folded"] = {**analysis.hessian_top_eigenvalue(folded_loss, theta, loss_batches,
                                                               key=jax.random.fold_in(key, 4),
                                                               iterations=hessian_iterations,
                                                               tolerance=hessian_tolerance),
                             "examples": examples}

  if "robustness" in analyses:
    units = r.get("units") or reinit.layer_order(model, key, jnp.asarray(first["image"][:1]),
                                                 train=False)
    out["robustness"] = analysis.layer_robustness(
        lambda v: _accuracy(logits_fn, v, test_ds), init, final, units)

  if extra:
    out["memorization"] = {"label_noise": label_noise, **analysis.memorization_metrics(
        train_pred["prediction"], train_pred["label"], train_pred["true_label"],
        train_pred["corrupted"])}
  elif "memorization" in analyses:
    out["memorization"] = None  # no label noise in this run, or batches without the fields
  out["wall_time_s"] = time.perf_counter() - start
  return out


def summary(result: dict) -> str:
  lines = [f"{result['run']['method']} on {result['run']['dataset']}:"]
  if "margins" in result:
    lines.append(f"  median train margin {result['margins']['train']['median']:.4g}, "
                 f"normalized {result['margins']['train_normalized']['median']:.4g}; "
                 f"BN-folded: sum ||W||_F {result['norms']['sum_frobenius_folded']:.4g}, "
                 f"log10 prod ||W||_2 {result['norms']['log10_product_spectral']:.4g}; "
                 f"raw sum ||W||_F {result['norms']['sum_frobenius']:.4g}")
  if "flatness" in result:
    pairs = zip(result["flatness"]["noise_scales"], result["flatness"]["mean"])
    lines.append("  loss increase " + ", ".join(f"{s:g}: {m:.4g}" for s, m in pairs))
  for name, what in (("hessian", "raw"), ("hessian_folded", "BN-folded")):
    if name in result:
      hessian = result[name]
      converged = ("" if hessian["relative_change"] < 1e-3 else
                   f" (not converged: last relative change {hessian['relative_change']:.2g}; "
                   "raise --hessian_iterations)")
      lines.append(f"  top Hessian eigenvalue ({what}) {hessian['eigenvalue']:.4g}{converged}")
  if "robustness" in result:
    drops = ", ".join(f"{u['unit']} {u['drop']:+.3f}" for u in result["robustness"]["units"])
    lines.append(f"  accuracy drop when reset: {drops}")
  if result.get("memorization"):
    m = result["memorization"]
    lines.append(f"  memorized {m['memorized']:.3f} of corrupted; clean accuracy "
                 f"{m['clean_accuracy']:.3f}")
  return "\n".join(lines)


def analyze_workdir(workdir: str, *, noise_scales, analyses, draws: int, batches: int,
                    power_iterations: int, hessian_iterations: int, seed: int,
                    hessian_tolerance: float = 0.0,
                    data_dir: str | None = None) -> tuple[dict, str]:
  """Analyzes the finished run in `workdir`; writes and returns (analysis, its path).

  Raises:
    reinit.train.ConfigError: no finished run there, or its data is not available.
  """
  from reinit import train  # pylint: disable=g-import-not-at-top
  from reinit import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  run = workdir_lib.load_run(workdir)
  config = run.config.copy_and_resolve_references()
  # Float32 whatever the run computed in: bfloat16 would drown Hessian products in rounding.
  config.compute_dtype = "float32"
  if data_dir:
    config.data_dir = data_dir
  model = train.create_model(config, run.results["num_classes"])
  train_ds, test_ds = load_datasets(config)
  result = analyze(run, model, train_ds, test_ds, noise_scales=noise_scales, draws=draws,
                   batches=batches, power_iterations=power_iterations,
                   hessian_iterations=hessian_iterations, analyses=analyses, seed=seed,
                   hessian_tolerance=hessian_tolerance)
  path = workdir_lib.path(workdir, workdir_lib.ANALYSIS_FILE)
  workdir_lib.write_json_atomically(path, result)
  return result, str(path)
