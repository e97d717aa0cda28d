"""Tests of the benchmark suite: the 12 dataset configs, their pipelines and one step per model,
class-balanced subsets and label noise across methods, and folders of images.

The 12 TFDS datasets are served by `tfds.testing.mock_data` (random examples; on disk only the
metadata that each builder's code defines, see conftest.py's `mock_tfds`), so these tests check
what the configs and pipelines do with each builder's real metadata (classes, native shapes,
split names), offline; subsets and label noise use the real embedded
`digits`. Compiling dominates the run time: models are tiny (width 1/16, batches of 8),
compiled without XLA's CPU optimizations, initialized on the host, and one program serves every
dataset of the same image shape and number of classes.
"""

import functools
import inspect
import json
import math
import os
import pathlib
import subprocess
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import benchmark
from reinit import data
from reinit import methods
from reinit import models
from reinit import train as train_lib
from reinit import validation

BENCHMARKS = [key for key in benchmark.DATASETS if key != "digits"]
MODELS = ("simple_cnn", "vgg16", "resnet18", "resnet50")
# Datasets on which every model runs a step: one at 32 px, one at 64 px.
ALL_MODEL_DATASETS = ("cifar10", "caltech101")
BATCH = 8
MOCK_EXAMPLES = 20  # 2 full training batches and a padded eval batch
WIDTH = 0.0625
# Each program runs once on tiny inputs: XLA's CPU optimizations cost more than they save, and
# the legacy (non-MLIR) fusion emitters compile these models 2-3x faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}


def bench_config(key, *, model="simple_cnn", method="lw", **overrides):
  """`configs/benchmark.py` for `key`, shrunk to tiny batches and width."""
  config = benchmark.get_config(f"dataset={key},model={model},method={method}")
  config.update(dict(batch_size=BATCH, eval_batch_size=BATCH, width=WIDTH))
  config.update(overrides)
  return config


def first(ds):
  return next(iter(tfds.as_numpy(ds)))


def masked(batches, field):
  return np.concatenate([b[field][b["mask"] > 0] for b in batches])


# --- the table ---------------------------------------------------------------------------------


def _parse_config_flag(value):
  """The ConfigDict of `--config=VALUE`, parsed as launch.main parses it."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
  flag_values(["launch.main", f"--config={value}"])
  return flag_values.config


# ml_collections loads config files with importlib's deprecated load_module().
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_all_keys_and_models_parse():
  """`--config=configs/benchmark.py:dataset=KEY,model=MODEL,method=lw`, as launch.main parses
  it, gives a config the trainer accepts, for every key and model (no data, no training)."""
  assert len(BENCHMARKS) == 12
  for key in benchmark.DATASETS:
    for model in MODELS:
      config = _parse_config_flag(f"configs/benchmark.py:dataset={key},model={model},method=lw")
      validation.validate(config)
      bench = benchmark.DATASETS[key]
      assert (config.dataset, config.model, config.method) == (key, model, "lw")
      assert config.tfds_name == bench.tfds_name
      assert (config.train_split, config.test_split) == (bench.train_split, bench.test_split)
      assert config.augment in data.AUGMENTATIONS
      assert config.label_noise == 0.0
  assert set(models.MODELS) == set(MODELS)
  folder = _parse_config_flag("configs/benchmark.py:dataset=folder:/data/images,model=vgg16")
  assert folder.tfds_name == "folder:/data/images" and folder.image_size is None


def _split_names(instruction):
  """Split names read by a parsed split string, e.g. ['train', 'validation']."""
  if hasattr(instruction, "left"):  # a sum of instructions
    return _split_names(instruction.left) + _split_names(instruction.right)
  return [instruction.split_name]


@pytest.mark.parametrize("key", BENCHMARKS)
def test_table_matches_tfds_metadata(key, tmp_path):
  """Classes, native shape and split names of the table are those of the installed builder."""
  bench = benchmark.DATASETS[key]
  builder = tfds.builder(bench.tfds_name, data_dir=str(tmp_path))  # code only: no download
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  assert builder.info.features[label_key].num_classes == bench.num_classes
  assert tuple(builder.info.features[image_key].shape) == bench.native_shape
  # Split strings parse, and name splits that the builder's code generates.
  source = inspect.getsource(inspect.getmodule(type(builder))).lower()
  for split in (bench.train_split, bench.test_split):
    for name in _split_names(tfds.core.ReadInstruction.from_spec(split)):
      assert name in ("train", "test", "validation") and name in source
  assert bench.train_size and bench.test_size
  if bench.image_size is None:
    assert None not in bench.native_shape


@pytest.mark.parametrize("key", BENCHMARKS)
def test_missing_dataset_names_the_tfds_build_command(key, tmp_path):
  config = bench_config(key, data_dir=str(tmp_path))
  start = time.monotonic()
  with pytest.raises(data.DatasetNotPreparedError) as info:
    data.Data(config)
  assert time.monotonic() - start < 10
  message = str(info.value)
  assert "\n" not in message
  assert f"tfds build {benchmark.DATASETS[key].tfds_name} --data_dir={tmp_path}" in message


def test_sizes_span_the_design_range():
  sizes = [benchmark.DATASETS[k].train_size for k in BENCHMARKS]
  assert min(sizes) == 2040 and max(sizes) == 73257  # DESIGN: 2k to 73k training images


# --- pipelines and one step per model ------------------------------------------------------------


def _stand_in_state(model, tx, image_shape):
  """A `TrainState` of `model.init`'s and `tx.init`'s shapes, filled on the host.

  Kernels are scaled normals, scales and variances ones, everything else zeros (which is what
  `tx.init` gives for SGD with momentum). `init` is tested in test_models.py; compiling its
  random-number programs and running `tx.init` op by op would cost as much as the train step.
  """
  dummy = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    if name == "kernel":
      fan_in = math.prod(leaf.shape[:-1])
      return rng.normal(0, fan_in ** -0.5, leaf.shape).astype(leaf.dtype)
    if name in ("scale", "var"):
      return np.ones(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, abstract)
  opt_state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                           jax.eval_shape(tx.init, variables["params"]))
  return train_lib.TrainState(step=np.zeros((), np.int32), variables=variables,
                              opt_state=opt_state, memory={})


@functools.cache
def _programs(model_name, image_shape, num_classes):
  """A train state and compiled (train_step, eval_step) for these shapes, shared by datasets."""
  config = bench_config("cifar10", model=model_name)
  model = train_lib.create_model(config, num_classes)
  tx = train_lib.make_optimizer(config)
  state = _stand_in_state(model, tx, image_shape)
  variables = state.variables
  train_batch = {"image": jnp.zeros((BATCH, *image_shape), jnp.float32),
                 "label": jnp.zeros((BATCH,), jnp.int32)}
  train_step = jax.jit(train_lib.make_train_step(
      model, tx, num_classes=num_classes, label_smoothing=0.0)).lower(
          state, train_batch, jnp.float32(0.01)).compile(FAST_COMPILE)
  eval_batch = {**train_batch, "mask": jnp.zeros((BATCH,), jnp.float32),
                "true_label": jnp.zeros((BATCH,), jnp.int32),
                "corrupted": jnp.zeros((BATCH,), jnp.float32)}
  eval_step = jax.jit(train_lib.make_eval_step(model, num_classes=num_classes)).lower(
      variables, eval_batch).compile(FAST_COMPILE)
  return state, train_step, eval_step


def _check_pipeline_and_step(mock_tfds, key, model_name):
  bench = benchmark.DATASETS[key]
  config = bench_config(key, model=model_name)
  with mock_tfds(bench.tfds_name, num_examples=MOCK_EXAMPLES):
    dataset = data.Data(config)
    info, steps = dataset.info, dataset.steps_per_epoch
    train_batch = first(dataset.train())
    eval_batches = list(tfds.as_numpy(dataset.eval(config.test_split)))
  size = bench.image_size or bench.native_shape[0]
  shape = (size, size, bench.native_shape[-1])
  assert info.image_shape == shape and info.num_classes == bench.num_classes
  assert info.train_examples == info.test_examples == MOCK_EXAMPLES
  assert steps == math.ceil(MOCK_EXAMPLES / BATCH)
  assert train_batch["image"].shape == (BATCH, *shape)
  assert train_batch["image"].dtype == np.float32 and train_batch["label"].dtype == np.int32
  assert np.all((0 <= train_batch["label"]) & (train_batch["label"] < bench.num_classes))
  assert len(eval_batches) == math.ceil(MOCK_EXAMPLES / BATCH)
  assert sum(b["mask"].sum() for b in eval_batches) == MOCK_EXAMPLES

  state, train_step, eval_step = _programs(model_name, shape, bench.num_classes)
  state, metrics = train_step(state, train_batch, jnp.float32(0.01))
  assert np.isfinite(float(metrics["loss"]))
  metrics = eval_step(state.variables, eval_batches[-1])
  assert int(metrics.accuracy.count) == eval_batches[-1]["mask"].sum()
  assert np.isfinite(float(metrics.loss.total))


@pytest.mark.parametrize("key", BENCHMARKS)
def test_pipeline_and_simple_cnn_step(key, mock_tfds):
  _check_pipeline_and_step(mock_tfds, key, "simple_cnn")


@pytest.mark.parametrize("model_name", [m for m in MODELS if m != "simple_cnn"])
@pytest.mark.parametrize("key", ALL_MODEL_DATASETS)
def test_pipeline_and_model_step(key, model_name, mock_tfds):
  _check_pipeline_and_step(mock_tfds, key, model_name)


# --- subsets, evaluation and label noise across methods ------------------------------------------


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """A data dir with the real (embedded) `digits` dataset built once."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  data.get_builder("digits", data_dir=data_dir)
  return data_dir


def _train_eval(config):
  return list(tfds.as_numpy(data.Data(config).train_eval()))


def test_subset_is_balanced_and_identical_across_methods(digits_dir):
  subsets = {}
  for method in methods.METHODS:
    config = bench_config("digits", method=method, train_examples=55, label_noise=0.2,
                          eval_batch_size=64, data_dir=digits_dir)
    batches = _train_eval(config)
    subsets[method] = {f: masked(batches, f) for f in ("label", "true_label", "corrupted")}
    counts = np.bincount(subsets[method]["true_label"], minlength=10)
    assert counts.sum() == 55 and set(counts) == {5, 6}
    assert subsets[method]["corrupted"].sum() == 11
  reference = subsets["lw"]
  for method, fields in subsets.items():
    for field, values in fields.items():
      np.testing.assert_array_equal(values, reference[field], err_msg=f"{method} {field}")
  # Another seed draws another subset.
  other = _train_eval(bench_config("digits", train_examples=55, seed=1, data_dir=digits_dir))
  assert not np.array_equal(masked(other, "true_label"), reference["true_label"])


@pytest.mark.parametrize("label_noise", [0.0, 0.1, 0.25, 0.5])
def test_label_noise_flips_exact_fraction_to_other_classes(label_noise, digits_dir):
  config = bench_config("digits", train_examples=100, label_noise=label_noise,
                        batch_size=10, eval_batch_size=16, data_dir=digits_dir)
  batches = _train_eval(config)
  label, true_label = masked(batches, "label"), masked(batches, "true_label")
  corrupted = masked(batches, "corrupted")
  assert len(label) == 100
  assert corrupted.sum() == round(label_noise * 100)
  np.testing.assert_array_equal(corrupted, (label != true_label).astype(np.float32))
  assert all(b["true_label"].dtype == np.int32 and b["corrupted"].dtype == np.float32
             for b in batches)
  dataset = data.Data(config)
  assert dataset.info.corrupted_examples == round(label_noise * 100)
  # Training batches carry the noisy labels: one epoch (10 batches of 10) is the subset.
  steps = dataset.steps_per_epoch
  epoch = np.concatenate([b["label"] for b in tfds.as_numpy(dataset.train().take(steps))])
  np.testing.assert_array_equal(np.sort(epoch), np.sort(label))


def test_corrupt_labels_uniform_nested_and_never_true():
  labels = np.repeat(np.arange(10), 1000)
  subset = np.arange(0, 10000, 2)
  noisy = data.corrupt_labels(labels, subset, num_classes=10, label_noise=0.5, seed=3)
  changed = np.flatnonzero(noisy != labels)
  assert len(changed) == 2500 and set(changed) <= set(subset)
  # The new class is uniform over the 9 others: shift counts near 2500 / 9 each.
  shifts = np.bincount((noisy[changed] - labels[changed]) % 10, minlength=10)
  assert shifts[0] == 0 and np.all(np.abs(shifts[1:] - 2500 / 9) < 80)
  smaller = data.corrupt_labels(labels, subset, num_classes=10, label_noise=0.2, seed=3)
  small_changed = np.flatnonzero(smaller != labels)
  assert len(small_changed) == 1000 and set(small_changed) <= set(changed)
  np.testing.assert_array_equal(smaller[small_changed], noisy[small_changed])
  again = data.corrupt_labels(labels, subset, num_classes=10, label_noise=0.5, seed=3)
  np.testing.assert_array_equal(again, noisy)
  other = data.corrupt_labels(labels, subset, num_classes=10, label_noise=0.5, seed=4)
  assert not np.array_equal(other, noisy)


@pytest.mark.parametrize("label_noise", [-0.1, 1.0, 1.5, "0.2", True])
def test_bad_label_noise_raises_one_line(label_noise, digits_dir):
  # A plain ConfigDict (as a caller might build one): no field types to stop bad values.
  config = ml_collections.ConfigDict(
      {**bench_config("digits", data_dir=digits_dir).to_dict(), "label_noise": label_noise})
  with pytest.raises(ValueError, match="label_noise") as info:
    data.Data(config)
  assert "\n" not in str(info.value) and "[0, 1)" in str(info.value)


def test_eval_counts_every_example_once(mock_tfds):
  config = bench_config("eurosat", eval_batch_size=16)
  with mock_tfds(config.tfds_name, num_examples=37):
    batches = list(tfds.as_numpy(data.Data(config).eval(config.test_split)))
    again = list(tfds.as_numpy(data.Data(config).eval(config.test_split)))
    # The whole split as a training subset: the same examples through the other path.
    config.update(dict(train_split=config.test_split, train_examples=-1))
    as_train = list(tfds.as_numpy(data.Data(config).train_eval()))
  assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 37
  assert all(b["image"].shape == (16, 64, 64, 3) for b in batches)
  for field in ("image", "label", "true_label", "corrupted", "mask"):
    np.testing.assert_array_equal(masked(again, field), masked(batches, field))
    np.testing.assert_array_equal(masked(as_train, field), masked(batches, field))
  np.testing.assert_array_equal(masked(batches, "true_label"), masked(batches, "label"))
  assert not masked(batches, "corrupted").any()
  padding = batches[-1]["mask"] == 0
  assert padding.sum() == 11 and not batches[-1]["image"][padding].any()
  # Test and train-subset batches share one structure: one compiled eval step serves both.
  assert set(batches[0]) == set(as_train[0]) == {"image", "label", "true_label", "corrupted",
                                                  "mask"}


# --- launch.benchmark --dataset ------------------------------------------------------------------


def test_benchmark_times_the_pipeline_of_a_dataset(digits_dir):
  """`launch.benchmark --dataset` (which took over launch/pipeline_benchmark.py) reports the
  pipeline's own speed and the pipeline-fed train step, under launch.common's XLA flags."""
  args = ["-m", "launch.benchmark", "--dataset=digits", f"--data_dir={digits_dir}",
          "--width=0.125", "--batch_size=16", "--steps=2", "--repeats=2",
          "--pipeline_batches=5", "--check_methods=none"]
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["dataset"] == "digits" and result["image_shape"] == [8, 8, 1]
  assert result["augment"] == "none"
  for key in ("pipeline_images_per_s", "input_pipeline_ratio", "pipeline_over_train_step"):
    assert isinstance(result[key], float) and result[key] > 0, (key, result[key])
  assert result["imported_tf"] is True


# --- a folder of images per class ----------------------------------------------------------------


CLASSES = ("ant", "bee", "cat")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """ROOT/{train,test}/CLASS/*.png|jpg of mixed sizes and channels: 12 + 6 images."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  for split, per_class in (("train", 4), ("test", 2)):
    for name in CLASSES:
      os.makedirs(root / split / name)
      for i in range(per_class):
        height, width = rng.integers(12, 40, size=2)
        image = rng.integers(0, 256, size=(height, width, 1 + 2 * (i % 2)), dtype=np.uint8)
        encoded = tf.io.encode_jpeg(image) if i == 2 else tf.io.encode_png(image)
        suffix = "jpg" if i == 2 else "png"
        tf.io.write_file(str(root / split / name / f"{i}.{suffix}"), encoded)
  return str(root)


def test_image_folder(image_folder):
  config = bench_config(f"folder:{image_folder}", image_size=16, augment="crop_flip",
                        batch_size=4, eval_batch_size=4)
  assert config.tfds_name == f"folder:{image_folder}"
  dataset = data.Data(config)
  assert dataset.info == data.DatasetInfo(num_classes=3, image_shape=(16, 16, 3),
                                          train_examples=12, test_examples=6)
  assert dataset.steps_per_epoch == 3
  batch = first(dataset.train())
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
  test = list(tfds.as_numpy(dataset.eval("test")))
  assert len(test) == 2 and np.bincount(masked(test, "label")).tolist() == [2, 2, 2]
  config.update(dict(train_examples=6, label_noise=0.5))
  train = list(tfds.as_numpy(data.Data(config).train_eval()))
  assert np.bincount(masked(train, "true_label")).tolist() == [2, 2, 2]
  assert masked(train, "corrupted").sum() == 3


def test_image_folder_errors_are_one_line(image_folder, tmp_path):
  config = bench_config(f"folder:{image_folder}")
  assert config.image_size is None
  with pytest.raises(ValueError, match="image_size") as info:
    data.Data(config)
  assert "\n" not in str(info.value)
  config.update(dict(image_size=16, train_split="train[:50%]"))
  with pytest.raises(ValueError, match="train_split") as info:
    data.Data(config)
  assert "\n" not in str(info.value)
  for root in (str(tmp_path / "missing"), str(tmp_path)):
    with pytest.raises(ValueError, match="folder:") as info:
      data.get_builder(f"folder:{root}")
    assert "\n" not in str(info.value)
