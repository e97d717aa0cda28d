"""tf.data input pipelines over TFDS datasets, deterministic and offline: the `Data` object.

A run builds one `Data(config)`: it resolves the TFDS builder and reads the training labels
once, then hands out the training stream, the evaluation passes and the dataset's sizes.
Everything is a pure function of the `ml_collections.ConfigDict`: the same config gives the
same training subset, the same shuffling and the same augmentation, batch after batch. Nothing
is ever downloaded (see `reinit.data.builders`).

Config fields read (all set by configs/benchmark.py):
  dataset: TFDS name (`digits`, `cifar10`, `eurosat/rgb`, ...), or
    `folder:ROOT` for a folder of images per class, ROOT/SPLIT/CLASS/*.png|jpg
    (read through `tfds.folder_dataset.ImageFolder`, whole splits only, no
    `data_dir`; needs `image_size`).
  tfds_name: TFDS name to read when `dataset` is a benchmark key; None = `dataset`.
  data_dir: TFDS data dir; None = TFDS's default.
  train_split, test_split: TFDS split strings, passed straight to TFDS, so
    `train[:80%]` or `train+validation` work.
  train_examples: size of the class-balanced training subset; None or -1 = the
    whole split (or `train_fraction` of it when that is set).
  train_fraction: alternative to `train_examples`, a fraction of the split.
  subset_seed: seed of the subset choice and of the label noise; None = `seed`.
  label_noise: fraction in [0, 1) of the training subset whose label is
    replaced by a different class drawn uniformly (seeded by `subset_seed`).
  image_size: int or (H, W) to resize to; None = native size.
  augment: "none", "crop" or "crop_flip" (reflect padding before the crop).
  seed: seed of shuffling and augmentation (and of the subset by default).
  batch_size: global training batch size.
  eval_batch_size: global evaluation batch size.

Images come out float32 (B, H, W, C), scaled to [0, 1] then normalized as
`(x - 0.5) / 0.25`; labels int32 (B,) (the noisy label when `label_noise` > 0).
Evaluation batches (test and train subset alike, so that one compiled eval step
serves both) also carry `mask`, `true_label` int32 (B,) and `corrupted` float32
(B,), 1 where the label was replaced by label noise.

This module imports no jax itself (clu's `pad_dataset` module does).
"""

from __future__ import annotations

import copy
import dataclasses
import math

from clu import deterministic_data
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# First: hides GPUs from TensorFlow before anything initializes TF's runtime.
from reinit.data import builders
from reinit.data import preprocess
from reinit.data import subsets

@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and a trainer need to know about a configured dataset.

  Attributes:
    num_classes: number of label classes.
    image_shape: (H, W, C) of the images the pipelines yield (after resizing).
    train_examples: size of the chosen training subset.
    test_examples: size of the test split.
    corrupted_examples: training examples whose label `label_noise` replaced.
  """

  num_classes: int
  image_shape: tuple[int, int, int]
  train_examples: int
  test_examples: int
  corrupted_examples: int = 0


def _per_process(global_batch: int, process_count: int, what: str) -> int:
  if global_batch % process_count:
    raise ValueError(
        f"{what}={global_batch} is not divisible by process_count={process_count}."
    )
  return global_batch // process_count


# ---------------------------------------------------------------------------
# Training.


def _train_pipeline(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    subset: np.ndarray,
    noisy_labels: np.ndarray,
    size: tuple[int, int] | None,
    augment: str,
    seed: int,
    batch_size: int,
    process_index: int,
    process_count: int,
) -> tf.data.Dataset:
  """Infinite, shuffled, augmented training batches of this process (see `Data.train`)."""
  local_batch = batch_size // process_count
  keep = preprocess.shard_mask(len(noisy_labels), subset)
  ds = preprocess.read_examples(
      builder, split, keep=keep, size=size, noisy_labels=noisy_labels
  )
  # Training needs only image and label: cache no more than that.
  ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]}).cache()
  # Shuffle before repeat: each epoch is a full fresh permutation of the
  # subset, the same in every process (same seed, same input order).
  ds = ds.shuffle(max(1, len(subset)), seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat().enumerate()
  # This process's rows of each global batch, dropped before augmenting.
  ds = ds.filter(
      lambda position, ex: (position % batch_size) // local_batch == process_index
  )
  # The second word was once the process index: 0 keeps single-process
  # streams what they were.
  base_seed = tf.constant([seed, 0], dtype=tf.int64)

  def prepare(position, ex):
    example_seed = tf.random.experimental.stateless_fold_in(base_seed, position)
    image = preprocess.augment_image(ex["image"], example_seed, augment=augment)
    return {"image": preprocess.normalize(image), "label": ex["label"]}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(preprocess.options())


# ---------------------------------------------------------------------------
# Evaluation.


def _eval_pipeline(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    indices: np.ndarray,
    split_size: int,
    size: tuple[int, int] | None,
    batch_size: int,
    process_index: int,
    process_count: int,
    noisy_labels: np.ndarray | None = None,
) -> tf.data.Dataset:
  """Masked eval batches over `indices` of `split`, sharded over processes.

  The global batches (`indices` in order, padded at the end) are those of a
  single process; process p yields rows [p * B, (p + 1) * B) of each, B =
  batch_size // process_count. Padding examples have a zero image, labels 0,
  corrupted 0 and mask 0; real ones mask 1.
  """
  local_batch = batch_size // process_count
  # Every process runs the same number of batches, so a global step never waits.
  num_batches = math.ceil(len(indices) / batch_size)
  positions = np.arange(num_batches * batch_size)
  mine = positions[(positions % batch_size) // local_batch == process_index]
  # Ascending: this process's real examples come first, then its padding.
  shard = indices[mine[mine < len(indices)]]
  keep = None
  if len(shard) != split_size:
    keep = preprocess.shard_mask(split_size, shard)
  ds = preprocess.read_examples(
      builder, split, keep=keep, size=size, noisy_labels=noisy_labels
  ).cache()
  ds = ds.map(lambda ex: {**ex, "image": preprocess.normalize(ex["image"])})
  # The filter hides the cardinality from `pad_dataset`: pass it.
  ds = deterministic_data.pad_dataset(
      ds, batch_dims=[local_batch], pad_up_to_batches=num_batches, cardinality=len(shard)
  )
  ds = ds.batch(local_batch, drop_remainder=True)
  # `pad_dataset`'s mask is bool; the eval step weighs by a float mask.
  ds = ds.map(lambda batch: {**batch, "mask": tf.cast(batch["mask"], tf.float32)})
  return ds.prefetch(tf.data.AUTOTUNE).with_options(preprocess.options())


# ---------------------------------------------------------------------------
# The data of a run.


# What a Data's split read depends on: the dataset (its TFDS name), where it is prepared, the
# split and the image size (`split_key`).
SPLIT_FIELDS = ("dataset", "data_dir", "train_split", "image_size")


def split_key(config: ml_collections.ConfigDict) -> tuple:
  """The values of `SPLIT_FIELDS` in `config` (the dataset as the TFDS name it reads)."""
  return (config.tfds_name or config.dataset, config.data_dir, config.train_split,
          config.image_size)


def _target_size(image_size) -> tuple[int, int] | None:
  if image_size is None:
    return None
  if isinstance(image_size, int):
    return image_size, image_size
  height, width = image_size
  return int(height), int(width)


class Data:
  """The configured dataset of one run: builder, training subset and labels resolved once.

  The global training stream (one shuffle per epoch of the whole training subset, batches of
  `batch_size`) is the same whatever the process count: process p yields rows [p * B,
  (p + 1) * B) of every global batch, B = batch_size // process_count, so the concatenation
  of the processes' batches in process order is the batch of a single process. Every process
  therefore reads and caches the whole subset (the benchmarks' subsets are small) but
  augments only its own rows. Augmentation uses stateless ops seeded by (seed, position in
  the global stream), so every `train()` yields the same batches. Evaluation batches are
  sharded the same way, with `eval_batch_size`.

  Raises (at construction) ValueError with a one-line message naming the field and the
  accepted values on bad input: unknown or unprepared dataset (`DatasetNotPreparedError`),
  bad split, `train_examples`, `label_noise`, `augment`, `image_size`, or a batch size that
  `process_count` does not divide.
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      *,
      process_index: int = 0,
      process_count: int = 1,
  ):
    subsets.check_label_noise(config.label_noise)
    builder = builders.get_builder(
        config.tfds_name or config.dataset, data_dir=config.data_dir
    )
    self._builder = builder
    self._size = _target_size(config.image_size)
    self._split_sizes = {}  # split -> examples, read once
    self._process = dict(process_index=process_index, process_count=process_count)
    self._configure(config)  # bad values fail here, before the split is read
    self._labels = preprocess.read_labels(builder, config.train_split)
    self._subset, self._noisy_labels = self._draw_subset(config)

  def _split_size(self, split: str) -> int:
    """Examples of `split` (`builders.split_size`), read once per Data and its copies."""
    if split not in self._split_sizes:
      self._split_sizes[split] = builders.split_size(self._builder, split)
    return self._split_sizes[split]

  def _configure(self, config: ml_collections.ConfigDict) -> None:
    """Checks `config`'s values and sets what it says beyond the split read (info, config);
    the subset is drawn from it afterwards (`_draw_subset`)."""
    label_noise = subsets.check_label_noise(config.label_noise)
    num_classes = builders.num_classes(self._builder)
    split_size = self._split_size(config.train_split)
    requested = subsets.requested_train_examples(
        config.train_examples, config.train_fraction, split_size
    )
    if requested is not None and requested != split_size:
      subsets.check_train_examples(requested, num_classes=num_classes, upper=split_size)
    train_examples = split_size if requested is None else requested
    self._info = DatasetInfo(
        num_classes=num_classes,
        image_shape=builders.image_shape(self._builder, self._size),
        train_examples=train_examples,
        test_examples=self._split_size(config.test_split),
        corrupted_examples=subsets.num_corrupted(train_examples, label_noise),
    )
    preprocess.check_augment(config.augment)
    process_count = self._process["process_count"]
    _per_process(config.batch_size, process_count, "batch_size")
    _per_process(config.eval_batch_size, process_count, "eval_batch_size")
    self._config = config

  def with_config(self, config: ml_collections.ConfigDict) -> "Data":
    """`Data(config)` without reading the training split again: for a config that reads the
    same split (`split_key`) and may differ in anything else (seed, train_examples,
    label_noise, batch sizes, ...). Raises ValueError as `Data(config)` does, or when `config`
    reads another split."""
    differ = [f"{field}={new!r}" for field, new, old
              in zip(SPLIT_FIELDS, split_key(config), split_key(self._config)) if new != old]
    if differ:
      raise ValueError(f"with_config reads the same split; these differ: {', '.join(differ)}")
    config = copy.deepcopy(config)
    data = copy.copy(self)  # shares the builder, the split's labels and sizes (never changed)
    data._configure(config)  # pylint: disable=protected-access
    data._subset, data._noisy_labels = data._draw_subset(config)  # pylint: disable=protected-access
    return data

  def _draw_subset(self, config) -> tuple[np.ndarray, np.ndarray]:
    """(subset indices, labels of the whole split after label noise) of `config`'s seed."""
    subset_seed = config.seed if config.subset_seed is None else config.subset_seed
    subset = subsets.train_subset_indices(
        self._labels,
        train_examples=subsets.requested_train_examples(
            config.train_examples, config.train_fraction, len(self._labels)
        ),
        num_classes=self._info.num_classes,
        seed=int(subset_seed),
    )
    noisy_labels = subsets.corrupt_labels(
        self._labels,
        subset,
        num_classes=self._info.num_classes,
        label_noise=subsets.check_label_noise(config.label_noise),
        seed=int(subset_seed),
    )
    return subset, noisy_labels

  def with_seed(self, seed: int) -> "Data":
    """The same dataset for the run of `seed` (its own subset, label noise and stream),
    without reading the split again: `Data(config with seed)` for a group of runs."""
    config = copy.deepcopy(self._config)
    config.seed = int(seed)
    return self.with_config(config)

  @property
  def info(self) -> DatasetInfo:
    """Classes, image shape (H, W, C) after resizing, subset and test split sizes."""
    return self._info

  @property
  def steps_per_epoch(self) -> int:
    """Global training batches per epoch: max(1, ceil(subset size / batch_size))."""
    return max(1, math.ceil(len(self._subset) / self._config.batch_size))

  def train_subset(self) -> tuple[np.ndarray, np.ndarray]:
    """(indices, labels): the training subset as indices into `train_split`, int64 (n,), in
    the order the stream shuffles them, and the label trained on of each (after
    `label_noise`), int32 (n,). What a group of runs puts on device (`reinit.group_train`)."""
    indices = np.asarray(self._subset, np.int64)
    return indices, np.asarray(self._noisy_labels, np.int32)[indices]

  def split_labels(self, indices: np.ndarray) -> np.ndarray:
    """The dataset's own labels (before `label_noise`) of `indices` of `train_split`, int32."""
    return np.asarray(self._labels, np.int32)[np.asarray(indices, np.int64)]

  def train_images(self, indices: np.ndarray) -> np.ndarray:
    """The raw images of `indices` (sorted, unique) of `train_split`, uint8 (n, H, W, C) in
    0..255 after resizing, unaugmented and unnormalized."""
    split_size = len(self._noisy_labels)
    ds = preprocess.read_examples(self._builder, self._config.train_split,
                                  keep=preprocess.shard_mask(split_size, indices),
                                  size=self._size)
    images = [ex["image"] for ex in ds.as_numpy_iterator()]
    return np.stack(images).astype(np.uint8) if images else np.zeros(
        (0, *self._info.image_shape), np.uint8)

  def train(self) -> tf.data.Dataset:
    """A fresh, never-ending dataset of this process's training batches.

    Returns:
      Dataset of `{"image": float32 (B, H, W, C), "label": int32 (B,)}` with B =
      batch_size // process_count (labels after `label_noise`); each call starts the same
      stream from its beginning.
    """
    return _train_pipeline(
        self._builder,
        self._config.train_split,
        subset=self._subset,
        noisy_labels=self._noisy_labels,
        size=self._size,
        augment=self._config.augment,
        seed=self._config.seed,
        batch_size=self._config.batch_size,
        **self._process,
    )

  def eval(self, split: str) -> tf.data.Dataset:
    """The whole `split` once, in order, in masked fixed-size batches.

    Args:
      split: TFDS split string, e.g. `config.test_split`.

    Returns:
      Finite dataset of `{"image": float32 (B, H, W, C), "label": int32 (B,), "mask":
      float32 (B,), "true_label": int32 (B,), "corrupted": float32 (B,)}` with B =
      eval_batch_size // process_count; the last batches are padded (mask 0) so every
      example counts exactly once. Here `true_label` equals `label` and `corrupted` is 0:
      the fields exist so that eval batches of the test split and of the training subset
      share one structure (one compiled eval step).
    """
    split_size = builders.split_size(self._builder, split)
    return _eval_pipeline(
        self._builder,
        split,
        indices=np.arange(split_size, dtype=np.int64),
        split_size=split_size,
        size=self._size,
        batch_size=self._config.eval_batch_size,
        **self._process,
    )

  def train_eval(self) -> tf.data.Dataset:
    """The training subset once, unaugmented, in split order, in masked batches.

    Same batches and fields as `eval`, over the examples that `train` trains on (for train
    accuracy). `label` is the label trained on (after `label_noise`), `true_label` the
    dataset's label and `corrupted` 1 where they differ, so that memorization of the
    corrupted labels can be measured.
    """
    return _eval_pipeline(
        self._builder,
        self._config.train_split,
        indices=self._subset,
        split_size=len(self._noisy_labels),
        size=self._size,
        batch_size=self._config.eval_batch_size,
        noisy_labels=self._noisy_labels,
        **self._process,
    )
