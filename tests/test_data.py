"""Tests of reinit.data: the offline `digits` dataset and the tf.data pipelines."""

import ast
import collections
import functools
import math
import pathlib
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import benchmark
from reinit import data
from reinit.data import builders
from reinit.data import digits as digits_lib
from reinit.data import preprocess


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """A data dir with `digits` built once for the whole session."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  data.get_builder("digits", data_dir=data_dir)
  return data_dir


def make_config(data_dir, dataset="digits", **overrides):
  """`configs/benchmark.py` for `dataset`, with 100 training examples in batches of 20."""
  config = benchmark.get_config(f"dataset={dataset}")
  config.update(dict(data_dir=data_dir, train_examples=100, augment="none", batch_size=20,
                     eval_batch_size=20))
  config.update(overrides)
  return config


def train_dataset(config, **shard):
  """(training dataset, steps per epoch) of `config`."""
  dataset = data.Data(config, **shard)
  return dataset.train(), dataset.steps_per_epoch


def eval_dataset(config, *, split, **shard):
  return data.Data(config, **shard).eval(split)


def eval_train_dataset(config, **shard):
  return data.Data(config, **shard).train_eval()


def take(ds, n):
  return [batch for _, batch in zip(range(n), tfds.as_numpy(ds))]


def split_labels(data_dir, split):
  builder = data.get_builder("digits", data_dir=data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return np.array([ex["label"] for ex in tfds.as_numpy(ds)])


def masked_labels(batches):
  return np.concatenate([b["label"][b["mask"] > 0] for b in batches])


# --- digits ------------------------------------------------------------------


def test_digits_builds_offline_with_fixed_split(digits_dir):
  builder = data.get_builder("digits", data_dir=digits_dir)
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 1297
  assert builder.info.splits["test"].num_examples == 500
  assert builder.info.features["label"].num_classes == 10
  assert builder.info.supervised_keys == ("image", "label")
  np.testing.assert_array_equal(
      np.bincount(split_labels(digits_dir, "test"), minlength=10), [50] * 10
  )
  example = next(iter(tfds.as_numpy(builder.as_dataset(split="train"))))
  assert example["image"].shape == (8, 8, 1)
  assert example["image"].dtype == np.uint8


def test_digits_pixels_are_sklearn_rescaled(digits_dir):
  images, _ = digits_lib.load_arrays()
  assert images.max() == 255
  builder = data.get_builder("digits", data_dir=digits_dir)
  total = sum(
      int(ex["image"].astype(np.int64).sum())
      for split in ("train", "test")
      for ex in tfds.as_numpy(builder.as_dataset(split=split))
  )
  assert total == int(images.astype(np.int64).sum())


def test_digits_second_use_reads_prepared_files(digits_dir):
  files = sorted(pathlib.Path(digits_dir, "digits").rglob("*"))
  mtimes = [f.stat().st_mtime_ns for f in files]
  data.get_builder("digits", data_dir=digits_dir)
  assert sorted(pathlib.Path(digits_dir, "digits").rglob("*")) == files
  assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_digits_split_is_fixed():
  _, labels = digits_lib.load_arrays()
  train, test = digits_lib.split_indices(labels)
  train2, test2 = digits_lib.split_indices(labels)
  np.testing.assert_array_equal(test, test2)
  np.testing.assert_array_equal(train, train2)
  assert len(train) == 1297 and len(test) == 500
  assert not set(train) & set(test)


# --- errors ------------------------------------------------------------------


def test_not_prepared_dataset_raises_fast(tmp_path):
  start = time.monotonic()
  with pytest.raises(data.DatasetNotPreparedError, match="tfds build") as info:
    data.get_builder("mnist", data_dir=str(tmp_path))
  assert time.monotonic() - start < 10
  message = str(info.value)
  assert isinstance(info.value, ValueError)
  assert "\n" not in message
  assert "mnist" in message and str(tmp_path) in message


def test_unknown_dataset_raises_one_line(tmp_path):
  with pytest.raises(ValueError, match="no_such_dataset") as info:
    data.get_builder("no_such_dataset", data_dir=str(tmp_path))
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("train_examples", [-5, 0, 5, 1298, 100000])
def test_bad_train_examples_raises(train_examples):
  labels = np.repeat(np.arange(10), 130)[:1297]
  with pytest.raises(ValueError, match="train_examples"):
    data.train_subset_indices(
        labels, train_examples=train_examples, num_classes=10, seed=0
    )


def test_bad_train_examples_raises_in_pipeline(digits_dir):
  for train_examples in (100000, -5):
    with pytest.raises(ValueError, match="train_examples"):
      data.Data(make_config(digits_dir, train_examples=train_examples))


def test_with_config_is_the_data_of_that_config_without_reading_the_split(digits_dir,
                                                                          monkeypatch):
  first = data.Data(make_config(digits_dir))
  info_before, subset_before = first.info, first.train_subset()[0].copy()
  cases = [dict(seed=3), dict(train_examples=50, batch_size=10), dict(label_noise=0.2, seed=1),
           dict(subset_seed=5, augment="crop_flip", test_split="test[:50%]"),
           dict(train_examples=None, train_fraction=0.5)]
  directs = [data.Data(make_config(digits_dir, **overrides)) for overrides in cases]

  def no_split_read(*args, **kwargs):
    raise AssertionError("the training split's labels were read again")
  monkeypatch.setattr(preprocess, "read_labels", no_split_read)
  for overrides, direct in zip(cases, directs):
    derived = first.with_config(make_config(digits_dir, **overrides))
    assert derived.info == direct.info and derived.steps_per_epoch == direct.steps_per_epoch
    for got, want in zip(derived.train_subset(), direct.train_subset()):
      np.testing.assert_array_equal(got, want)
    got, want = take(derived.train(), 2), take(direct.train(), 2)
    assert all(np.array_equal(g[k], w[k]) for g, w in zip(got, want) for k in w)
  assert first.info == info_before  # left as it was
  np.testing.assert_array_equal(first.train_subset()[0], subset_before)
  with pytest.raises(ValueError, match="image_size=16"):
    first.with_config(make_config(digits_dir, image_size=16))
  with pytest.raises(ValueError, match="train_examples"):
    first.with_config(make_config(digits_dir, train_examples=5))  # what Data(config) raises


def test_bad_augment_raises(digits_dir):
  with pytest.raises(ValueError, match="augment"):
    data.Data(make_config(digits_dir, augment="mixup"))


# --- subset ------------------------------------------------------------------


def test_subset_is_balanced():
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 50))
  subset = data.train_subset_indices(
      labels, train_examples=100, num_classes=10, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[subset]), [10] * 10)
  subset = data.train_subset_indices(
      labels, train_examples=105, num_classes=10, seed=0)
  counts = np.bincount(labels[subset])
  assert counts.sum() == 105 and set(counts) == {10, 11}
  assert np.all(np.diff(subset) > 0)  # sorted and unique


def test_subset_depends_only_on_seed():
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 50))
  pick = lambda seed: data.train_subset_indices(
      labels, train_examples=105, num_classes=10, seed=seed
  )
  np.testing.assert_array_equal(pick(3), pick(3))
  assert not np.array_equal(pick(3), pick(4))


@pytest.mark.parametrize("train_examples", [None, -1, 500])
def test_subset_all(train_examples):
  labels = np.repeat(np.arange(10), 50)
  subset = data.train_subset_indices(
      labels, train_examples=train_examples, num_classes=10, seed=0
  )
  np.testing.assert_array_equal(subset, np.arange(500))


def test_dataset_info(digits_dir):
  info = data.Data(make_config(digits_dir, image_size=16)).info
  assert info == data.DatasetInfo(
      num_classes=10, image_shape=(16, 16, 1), train_examples=100,
      test_examples=500)
  info = data.Data(make_config(digits_dir, train_examples=None)).info
  assert info.train_examples == 1297 and info.image_shape == (8, 8, 1)


# --- training ------------------------------------------------------------------


def test_train_batches(digits_dir):
  ds, steps = train_dataset(make_config(digits_dir, batch_size=32))
  assert steps == math.ceil(100 / 32)
  for batch in take(ds, 5):  # Past the end of the first epoch.
    assert batch["image"].shape == (32, 8, 8, 1)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,)
    assert batch["label"].dtype == np.int32
    assert batch["image"].min() >= -2.0 and batch["image"].max() <= 2.0


def test_train_is_deterministic(digits_dir):
  config = make_config(digits_dir, augment="crop_flip")
  first = take(train_dataset(config)[0], 3)
  second = take(train_dataset(config)[0], 3)
  # Two datasets of one Data are independent streams, each from the start (the trainer
  # draws LW's calibration batches from a second one while training on the first).
  dataset = data.Data(config)
  training, calibration = iter(tfds.as_numpy(dataset.train())), dataset.train()
  third = [next(training) for _ in range(2)]
  fourth = take(calibration, 3)
  third.append(next(training))
  for a, b in zip(first, second + third + fourth):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  other_config = make_config(digits_dir, augment="crop_flip", seed=1)
  other = take(train_dataset(other_config)[0], 1)
  assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_train_epoch_covers_subset_once(digits_dir):
  config = make_config(digits_dir)  # 100 examples, batches of 20.
  ds, steps = train_dataset(config)
  assert steps == 5
  batches = take(ds, 2 * steps)
  subset_labels = masked_labels(take(eval_train_dataset(config), 100))
  for epoch in (batches[:steps], batches[steps:]):
    labels = np.concatenate([b["label"] for b in epoch])
    np.testing.assert_array_equal(np.sort(labels), np.sort(subset_labels))
  # Reshuffled every epoch.
  assert not np.array_equal(batches[0]["image"], batches[steps]["image"])


def test_augmentation_changes_images_not_shapes(digits_dir):
  plain = take(train_dataset(make_config(digits_dir))[0], 2)
  for augment in ("crop", "crop_flip"):
    config = make_config(digits_dir, augment=augment)
    augmented = take(train_dataset(config)[0], 2)
    for a, b in zip(plain, augmented):
      assert a["image"].shape == b["image"].shape
      assert a["image"].dtype == b["image"].dtype
      np.testing.assert_array_equal(a["label"], b["label"])  # Same order.
      assert not np.array_equal(a["image"], b["image"])


def test_resize(digits_dir):
  config = make_config(digits_dir, image_size=16, augment="crop")
  ds, _ = train_dataset(config)
  assert take(ds, 1)[0]["image"].shape == (20, 16, 16, 1)
  # (H, W) is accepted too, though configs/benchmark.py types `image_size` as an int.
  config = ml_collections.ConfigDict({**make_config(digits_dir).to_dict(), "image_size": (12, 10)})
  batch = take(eval_dataset(config, split="test"), 1)[0]
  assert batch["image"].shape == (20, 12, 10, 1)


def _joined(parts):
  """The processes' batches side by side: what the global batch holds, in process order."""
  return [{key: np.concatenate([p[key] for p in batches]) for key in batches[0]}
          for batches in zip(*parts)]


def test_processes_feed_blocks_of_the_single_process_batches(digits_dir):
  # Global batches must not depend on the process count: P processes on D devices then compute
  # what one process on D devices does. 12 batches: three epochs, augmentation on.
  config = make_config(digits_dir, batch_size=32, augment="crop")
  single, steps = train_dataset(config)
  shards = [
      train_dataset(config, process_index=i, process_count=2) for i in range(2)
  ]
  assert steps == 4 and [s for _, s in shards] == [4, 4]
  parts = [take(ds, 12) for ds, _ in shards]
  assert parts[0][0]["image"].shape == (16, 8, 8, 1)
  for joined, expected in zip(_joined(parts), take(single, 12), strict=True):
    for key in ("image", "label"):
      np.testing.assert_array_equal(joined[key], expected[key])

  # Eval: the same padded global batches; together the processes count each example once.
  config = make_config(digits_dir, batch_size=32)
  for split in (eval_train_dataset, functools.partial(eval_dataset, split="test")):
    whole = list(tfds.as_numpy(split(config)))
    parts = [list(tfds.as_numpy(split(config, process_index=i, process_count=2)))
             for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for joined, expected in zip(_joined(parts), whole, strict=True):
      assert joined.keys() == expected.keys()
      for key in expected:
        np.testing.assert_array_equal(joined[key], expected[key])

# --- evaluation ----------------------------------------------------------------


def test_eval_covers_split_exactly_once(digits_dir):
  config = make_config(digits_dir, eval_batch_size=64)
  batches = list(tfds.as_numpy(eval_dataset(config, split="test")))
  assert len(batches) == math.ceil(500 / 64)
  for batch in batches:
    assert batch["image"].shape == (64, 8, 8, 1)
    assert batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert batch["mask"].dtype == np.float32 and batch["mask"].shape == (64,)
  assert sum(b["mask"].sum() for b in batches) == 500
  assert batches[-1]["mask"][-1] == 0
  expected = split_labels(digits_dir, "test")
  np.testing.assert_array_equal(np.sort(masked_labels(batches)), np.sort(expected))


def test_eval_batches_have_eval_batch_size(digits_dir):
  config = make_config(digits_dir, batch_size=32, eval_batch_size=50)
  batches = list(tfds.as_numpy(eval_dataset(config, split="test")))
  assert len(batches) == 10
  assert all(b["image"].shape[0] == 50 for b in batches)


def test_eval_sub_split(digits_dir):
  config = make_config(digits_dir)
  batches = list(tfds.as_numpy(eval_dataset(config, split="train[:10%]")))
  expected = split_labels(digits_dir, "train[:10%]")
  np.testing.assert_array_equal(np.sort(masked_labels(batches)), np.sort(expected))


def test_eval_train_is_the_subset(digits_dir):
  config = make_config(digits_dir, train_examples=105)
  batches = list(tfds.as_numpy(eval_train_dataset(config)))
  labels = masked_labels(batches)
  assert len(labels) == 105
  assert set(np.bincount(labels, minlength=10)) == {10, 11}


# --- mocked TFDS dataset -----------------------------------------------------


def test_mock_cifar10(mock_tfds):
  config = make_config(
      None, dataset="cifar10", image_size=32, train_examples=105,
      augment="crop_flip", batch_size=16,
  )
  with mock_tfds("cifar10", num_examples=300):
    dataset = data.Data(config)
    assert dataset.info.image_shape == (32, 32, 3) and dataset.info.num_classes == 10
    assert dataset.steps_per_epoch == math.ceil(105 / 16)
    batch = take(dataset.train(), 1)[0]
    assert batch["image"].shape == (16, 32, 32, 3)
    assert batch["label"].shape == (16,)
    labels = masked_labels(list(tfds.as_numpy(dataset.train_eval())))
    assert len(labels) == 105
    assert set(np.bincount(labels, minlength=10)) == {10, 11}


# --- hygiene -----------------------------------------------------------------


def test_data_resolves_the_builder_and_reads_the_labels_once(digits_dir, monkeypatch):
  calls = collections.Counter()

  def counted(name, function):
    def wrapper(*args, **kwargs):
      calls[name] += 1
      return function(*args, **kwargs)
    monkeypatch.setattr(function.__module__ + "." + function.__name__, wrapper)

  counted("builder", builders.get_builder)
  counted("labels", preprocess.read_labels)
  config = make_config(digits_dir, label_noise=0.1)
  dataset = data.Data(config)
  for ds in (dataset.train(), dataset.train(), dataset.eval("test"), dataset.train_eval()):
    take(ds, 1)
  assert calls == {"builder": 1, "labels": 1}


def test_registry_imports_no_tensorflow():
  # The GPU benchmark machine has no TensorFlow: configs and the registry must not need it.
  script = ("import sys, configs.benchmark, reinit.data, reinit.data.registry; "
            "reinit.data.DATASETS; "
            'assert "tensorflow" not in sys.modules, "tensorflow"; '
            'assert "tensorflow_datasets" not in sys.modules, "tfds"')
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                       check=False, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]


def test_data_package_does_not_import_jax():
  package = pathlib.Path(data.__file__).parent
  for path in package.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""]
      else:
        continue
      assert not any(n == "jax" or n.startswith("jax.") for n in names), path
