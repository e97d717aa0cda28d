"""tf.data input pipelines over TFDS datasets, deterministic and offline.

Every dataset here is a pure function of its `ml_collections.ConfigDict`: the same
config gives the same training subset, the same shuffling and the same
augmentation, batch after batch. Nothing is ever downloaded: `digits` is built
locally from scikit-learn on first use, any other TFDS dataset must already be
prepared in `config.data_dir` (`tfds build NAME --data_dir=DIR`).

Config fields read (optional ones with their default):
  dataset: TFDS name (`digits`, `cifar10`, `eurosat/rgb`, ...), or
    `folder:ROOT` for a folder of images per class, ROOT/SPLIT/CLASS/*.png|jpg
    (read through `tfds.folder_dataset.ImageFolder`, whole splits only, no
    `data_dir`; needs `image_size`).
  tfds_name (None): TFDS name to read when `dataset` is a benchmark key.
  data_dir (None): TFDS data dir; None = TFDS's default.
  train_split ('train'), test_split ('test'): TFDS split strings, passed straight
    to TFDS, so `train[:80%]` or `train+validation` work.
  train_examples (None): size of the class-balanced training subset; None or -1
    = the whole split.
  train_fraction (None): alternative to `train_examples`, a fraction of the split.
  subset_seed (None): seed of the subset choice and of the label noise;
    None = `seed`.
  label_noise (0): fraction in [0, 1) of the training subset whose label is
    replaced by a different class drawn uniformly (seeded by `subset_seed`).
  image_size (None): int or (H, W) to resize to; None = native size.
  augment ('none'): 'none', 'crop' or 'crop_flip'.
  pad_mode ('reflect'): 'reflect' or 'zero', the padding before a random crop.
  seed: seed of shuffling and augmentation (and of the subset by default).
  batch_size: global training batch size.
  eval_batch_size (batch_size): global evaluation batch size.

Images come out float32 (B, H, W, C), scaled to [0, 1] then normalized as
`(x - 0.5) / 0.25`; labels int32 (B,) (the noisy label when `label_noise` > 0).
Evaluation batches (test and train subset alike, so that one compiled eval step
serves both) also carry `mask`, `true_label` int32 (B,) and `corrupted` float32
(B,), 1 where the label was replaced by label noise.

This module never imports jax. It hides GPUs from TensorFlow at import so that
TF leaves accelerator memory to JAX.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# Imported for its side effect: registers the local `digits` builder with TFDS.
from reinit.data import digits  # pylint: disable=unused-import  # noqa: F401


def _hide_gpus_from_tf() -> None:
  # TF would otherwise pre-allocate most of the GPU memory that JAX needs.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    # TF's runtime was already initialized by the importer: too late to
    # change, and not ours to change.
    pass


_hide_gpus_from_tf()

AUGMENTATIONS = ('none', 'crop', 'crop_flip')
PAD_MODES = {'reflect': 'REFLECT', 'zero': 'CONSTANT'}
# Largest padding before a random crop; small images use size // 8 instead.
MAX_CROP_PAD = 4
_MEAN, _STD = 0.5, 0.25
_LOCAL_DATASETS = ('digits',)
FOLDER_PREFIX = 'folder:'
# Second entropy word of the label-noise generator: a stream independent of the
# subset choice, which uses the bare seed.
_NOISE_STREAM = 1


class DatasetNotPreparedError(ValueError):
  """A TFDS dataset is not prepared in the data dir (and is never downloaded)."""


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


# ---------------------------------------------------------------------------
# Builders.


def get_builder(
    dataset: str, *, data_dir: str | None = None
) -> tfds.core.DatasetBuilder:
  """Returns the prepared TFDS builder of `dataset`; never downloads.

  Args:
    dataset: TFDS name, optionally with config/version (`eurosat/rgb`).
      `digits` is built locally on first use.
    data_dir: TFDS data dir; None = TFDS's default data dir.

  Returns:
    A prepared `tfds.core.DatasetBuilder`.

  Raises:
    DatasetNotPreparedError: the dataset is not prepared in `data_dir`.
    ValueError: TFDS knows no dataset of that name, or a `folder:` root holds
      no SPLIT/CLASS/image files.
  """
  if dataset.startswith(FOLDER_PREFIX):
    return _folder_builder(dataset[len(FOLDER_PREFIX):])
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    # TFDS's own message lists every dataset it knows: keep ours to one line.
    raise ValueError(
        f'dataset={dataset!r} is unknown (data_dir={data_dir!r}); accepted: a key of '
        'configs/benchmark.py DATASETS (e.g. digits, cifar10, flowers) or a TFDS name '
        '(tfds.list_builders())'
    ) from None
  if builder.is_prepared() or _tfds_is_mocked():
    return builder
  if builder.name in _LOCAL_DATASETS:
    _prepare_local(builder)
    # A fresh builder reads the metadata of the files just written.
    return tfds.builder(dataset, data_dir=data_dir)
  root = builder.data_dir_root
  raise DatasetNotPreparedError(
      f'Dataset {dataset!r} is not prepared in data_dir {str(root)!r} and is '
      f'never downloaded here; prepare it with: '
      f'tfds build {dataset} --data_dir={root}'
  )


def _folder_builder(root: str) -> tfds.folder_dataset.ImageFolder:
  """`ImageFolder` over ROOT/SPLIT/CLASS/*.png|jpg; classes: sorted CLASS names."""
  accepted = 'folder:ROOT with ROOT/SPLIT/CLASS/*.png|jpg'
  if not root or not tf.io.gfile.isdir(root):
    raise ValueError(
        f'dataset={FOLDER_PREFIX + root!r}: {root!r} is not a directory; '
        f'accepted: {accepted}'
    )
  builder = tfds.folder_dataset.ImageFolder(root)
  if not builder.info.splits or not builder.info.features['label'].num_classes:
    raise ValueError(
        f'dataset={FOLDER_PREFIX + root!r} holds no images in SPLIT/CLASS '
        f'folders; accepted: {accepted}'
    )
  return builder


def _is_folder(builder: tfds.core.DatasetBuilder) -> bool:
  return isinstance(builder, tfds.folder_dataset.ImageFolder)


def _tfds_is_mocked() -> bool:
  """Whether `tfds.testing.mock_data` is active.

  Under the mock nothing is on disk, yet every builder serves random examples:
  treat it as prepared so that tests can drive the real pipelines.
  """
  as_dataset = tfds.core.DatasetBuilder.as_dataset
  return getattr(as_dataset, '__module__', '').startswith('tensorflow_datasets.testing')


def _prepare_local(builder: tfds.core.DatasetBuilder) -> None:
  """Builds a local (download-free) dataset such as `digits` into its data dir."""
  try:
    builder.download_and_prepare()
  except Exception:  # pylint: disable=broad-except
    # Several processes may prepare at once; only one rename wins, and that is
    # fine as long as the data ends up there.
    if not builder.is_prepared():
      raise


def _supervised_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  keys = builder.info.supervised_keys
  if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys
  return 'image', 'label'


def _num_classes(builder: tfds.core.DatasetBuilder) -> int:
  return builder.info.features[_supervised_keys(builder)[1]].num_classes


def _split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Number of examples `as_dataset(split)` yields (sub-splits understood)."""
  if _is_folder(builder) and split not in builder.info.splits:
    # ImageFolder has no sub-split API: name the field's accepted values.
    raise ValueError(
        f'split {split!r} is not a folder of {builder.data_dir!r}; accepted '
        f'(train_split, test_split): {", ".join(builder.info.splits)}'
    )
  # The dataset's cardinality is what will actually be read; under
  # `tfds.testing.mock_data` it differs from the recorded split sizes.
  cardinality = int(builder.as_dataset(split=split).cardinality())
  if cardinality >= 0:
    return cardinality
  return builder.info.splits[split].num_examples


# ---------------------------------------------------------------------------
# Config helpers.


def _builder_for(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  # A benchmark key (e.g. 'svhn') names its TFDS dataset in `tfds_name`; others are TFDS names.
  name = config.get('tfds_name', None) or config.dataset
  return get_builder(name, data_dir=config.get('data_dir', None))


def _optional(config: ml_collections.ConfigDict, name: str, default: Any) -> Any:
  value = config.get(name, None)
  return default if value is None else value


def _train_split(config: ml_collections.ConfigDict) -> str:
  return _optional(config, 'train_split', 'train')


def _test_split(config: ml_collections.ConfigDict) -> str:
  return _optional(config, 'test_split', 'test')


def _subset_seed(config: ml_collections.ConfigDict) -> int:
  return int(_optional(config, 'subset_seed', config.seed))


def _eval_batch_size(config: ml_collections.ConfigDict) -> int:
  return int(_optional(config, 'eval_batch_size', config.batch_size))


def _target_size(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  size = config.get('image_size', None)
  if size is None:
    return None
  if isinstance(size, int):
    return size, size
  height, width = size
  return int(height), int(width)


def _requested_train_examples(
    config: ml_collections.ConfigDict, split_size: int
) -> int | None:
  """`train_examples` (or `train_fraction` of the split); None means all."""
  examples = config.get('train_examples', None)
  if examples is not None and examples != -1:
    return int(examples)
  fraction = config.get('train_fraction', None)
  if fraction is not None:
    return int(round(float(fraction) * split_size))
  return None


def _per_process(global_batch: int, process_count: int, what: str) -> int:
  if global_batch % process_count:
    raise ValueError(
        f'{what}={global_batch} is not divisible by process_count={process_count}.'
    )
  return global_batch // process_count


def _check_augment(augment: str) -> str:
  if augment not in AUGMENTATIONS:
    raise ValueError(f'augment={augment!r}; expected one of {AUGMENTATIONS}.')
  return augment


def _image_shape(
    builder: tfds.core.DatasetBuilder, size: tuple[int, int] | None
) -> tuple[int, int, int]:
  """(H, W, C) of the images after resizing to `size` (None = native)."""
  native = builder.info.features[_supervised_keys(builder)[0]].shape
  height, width = size if size is not None else native[:2]
  if height is None or width is None:
    name = builder.name
    if _is_folder(builder):
      name = FOLDER_PREFIX + builder.data_dir
    raise ValueError(
        f'image_size=None is invalid for {name!r}, whose images have no fixed '
        f'size {tuple(native)}; accepted: an int or (height, width)'
    )
  return int(height), int(width), int(native[-1])


def _label_noise(config: ml_collections.ConfigDict) -> float:
  noise = _optional(config, 'label_noise', 0.0)
  is_number = isinstance(noise, (int, float)) and not isinstance(noise, bool)
  if not is_number or not 0 <= noise < 1:
    raise ValueError(
        f'label_noise={noise!r} is invalid; accepted: a float in [0, 1)'
    )
  return float(noise)


def num_corrupted(train_examples: int, label_noise: float) -> int:
  """Number of training labels that `label_noise` replaces: round(noise * n)."""
  return int(round(label_noise * train_examples))


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Sizes and shapes of the configured dataset, without reading its examples.

  Args:
    config: the data config (see the module docstring).

  Returns:
    A `DatasetInfo`; `image_shape` is (H, W, C) after resizing and
    `train_examples` the size of the chosen training subset.
  """
  label_noise = _label_noise(config)
  builder = _builder_for(config)
  num_classes = _num_classes(builder)
  split_size = _split_size(builder, _train_split(config))
  requested = _requested_train_examples(config, split_size)
  if requested is not None and requested != split_size:
    _check_train_examples(requested, num_classes=num_classes, upper=split_size)
  train_examples = split_size if requested is None else requested
  return DatasetInfo(
      num_classes=num_classes,
      image_shape=_image_shape(builder, _target_size(config)),
      train_examples=train_examples,
      test_examples=_split_size(builder, _test_split(config)),
      corrupted_examples=num_corrupted(train_examples, label_noise),
  )


# ---------------------------------------------------------------------------
# Training subset.


def _check_train_examples(train_examples: int, *, num_classes: int, upper: int):
  if not num_classes <= train_examples <= upper:
    raise ValueError(
        f'train_examples={train_examples} is out of range: accepted are '
        f'{num_classes}..{upper} (class-balanced), or None / -1 for the whole '
        f'split.'
    )


def train_subset_indices(
    labels: np.ndarray,
    *,
    train_examples: int | None,
    num_classes: int,
    seed: int,
) -> np.ndarray:
  """Indices of a class-balanced, seed-determined training subset.

  Each class gets `train_examples // num_classes` examples; the remainder goes
  one each to classes drawn by the seed. Examples within a class are drawn by
  `np.random.default_rng(seed)`, so the subset depends only on (labels,
  train_examples, num_classes, seed), never on the method or batch size.

  Args:
    labels: int (N,) class of each example of the split, in split order.
    train_examples: subset size; None, -1 or N = the whole split.
    num_classes: number of classes; labels lie in 0..num_classes-1.
    seed: seed of the choice.

  Returns:
    int64 (train_examples,) sorted indices into `labels`.

  Raises:
    ValueError: `train_examples` is below `num_classes`, above the split size,
      or needs more examples of some class than the split holds.
  """
  labels = np.asarray(labels)
  size = len(labels)
  if train_examples is None or train_examples == -1 or train_examples == size:
    return np.arange(size, dtype=np.int64)
  counts = np.bincount(labels, minlength=num_classes)[:num_classes]
  per_class, remainder = divmod(train_examples, num_classes)
  balanced_max = num_classes * int(counts.min())
  _check_train_examples(
      train_examples, num_classes=num_classes, upper=min(size, balanced_max)
  )
  rng = np.random.default_rng(seed)
  extra = np.zeros(num_classes, dtype=np.int64)
  extra[rng.choice(num_classes, size=remainder, replace=False)] = 1
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    # per_class + 1 <= counts.min() whenever there is a remainder, so every
    # class has enough members (checked above).
    chosen.append(rng.choice(members, size=per_class + extra[c], replace=False))
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def corrupt_labels(
    labels: np.ndarray,
    subset: np.ndarray,
    *,
    num_classes: int,
    label_noise: float,
    seed: int,
) -> np.ndarray:
  """The split's labels after label noise on a seeded fraction of the subset.

  `num_corrupted(len(subset), label_noise)` examples of `subset` get the label
  `(y + s) % num_classes` with s uniform in 1..num_classes-1, i.e. a class drawn
  uniformly from the other classes. The permutation that picks them and the
  shifts are drawn for the whole subset before `label_noise` is looked at, so
  the result depends only on (labels, subset, num_classes, seed, label_noise),
  never on the method, and a larger `label_noise` corrupts a superset of the
  examples (with the same new labels) that a smaller one does.

  Args:
    labels: int (N,) true class of each example of the split, in split order.
    subset: int (n,) indices into `labels` of the training subset.
    num_classes: number of classes; labels lie in 0..num_classes-1.
    label_noise: fraction in [0, 1) of the subset to corrupt.
    seed: seed of the choice (the subset seed).

  Returns:
    int64 (N,) labels: equal to `labels` except at the corrupted indices.
  """
  labels = np.asarray(labels, dtype=np.int64)
  subset = np.asarray(subset, dtype=np.int64)
  noisy = labels.copy()
  count = num_corrupted(len(subset), label_noise)
  if count == 0:
    return noisy
  if num_classes < 2:
    raise ValueError(
        f'label_noise={label_noise} is invalid with num_classes={num_classes}; '
        'accepted: 0 (no other class to draw from)'
    )
  rng = np.random.default_rng([seed, _NOISE_STREAM])
  order = rng.permutation(len(subset))
  shifts = rng.integers(1, num_classes, size=len(subset))
  chosen = order[:count]
  noisy[subset[chosen]] = (labels[subset[chosen]] + shifts[chosen]) % num_classes
  return noisy


def _read_undecoded(
    builder: tfds.core.DatasetBuilder, split: str
) -> tf.data.Dataset:
  """`split` in its fixed order: `{image_key: encoded bytes, label_key: int}`.

  Labels and examples are both read through this one function so that they
  line up index by index (under `tfds.testing.mock_data` the random examples
  even depend on which features are decoded).
  """
  image_key, label_key = _supervised_keys(builder)
  # Decode the image after filtering, so that dropped examples cost nothing.
  skip_image = {image_key: tfds.decode.SkipDecoding()}
  if _is_folder(builder):
    # ImageFolder decodes with the plain decoders dict, not PartialDecoding.
    decoders = skip_image
  else:
    # Parse only image and label (some datasets carry masks or boxes).
    decoders = tfds.decode.PartialDecoding(
        {image_key: True, label_key: True}, decoders=skip_image
    )
  return builder.as_dataset(
      split=split,
      shuffle_files=False,
      decoders=decoders,
      read_config=_read_config(),
  )


def _read_labels(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
  """Labels int64 (N,) of `split` in its read order, images left undecoded."""
  _, label_key = _supervised_keys(builder)
  ds = _read_undecoded(builder, split).map(lambda ex: ex[label_key]).batch(8192)
  batches = [np.asarray(b, dtype=np.int64) for b in tfds.as_numpy(ds)]
  return np.concatenate(batches) if batches else np.zeros((0,), np.int64)


def _subset(
    config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder
) -> tuple[np.ndarray, np.ndarray]:
  """The configured training subset and the labels it trains on.

  Returns:
    `(subset, noisy_labels)`: sorted indices int64 (n,) into the train split,
    and int64 (N,) labels of the whole split after `label_noise`.
  """
  label_noise = _label_noise(config)
  labels = _read_labels(builder, _train_split(config))
  num_classes = _num_classes(builder)
  subset = train_subset_indices(
      labels,
      train_examples=_requested_train_examples(config, len(labels)),
      num_classes=num_classes,
      seed=_subset_seed(config),
  )
  noisy_labels = corrupt_labels(
      labels,
      subset,
      num_classes=num_classes,
      label_noise=label_noise,
      seed=_subset_seed(config),
  )
  return subset, noisy_labels


# ---------------------------------------------------------------------------
# Reading and preprocessing.


def _read_config() -> tfds.ReadConfig:
  # We cache ourselves, after filtering and resizing.
  return tfds.ReadConfig(try_autocache=False)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def _read_examples(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    keep: np.ndarray | None,
    size: tuple[int, int] | None,
    noisy_labels: np.ndarray | None = None,
) -> tf.data.Dataset:
  """Decoded examples of `split` in split order.

  Args:
    builder: a prepared builder.
    split: TFDS split string.
    keep: bool (N,) which examples of the split to keep; None = all.
    size: (H, W) to resize to; None = native.
    noisy_labels: int (N,) label to train on for each example of the split
      (see `corrupt_labels`); None = the true labels.

  Returns:
    Dataset of `{'image': uint8 (H, W, C), 'label': int32 (), 'true_label':
    int32 (), 'corrupted': float32 ()}`; `corrupted` is 1 where `label` differs
    from `true_label`.
  """
  image_key, label_key = _supervised_keys(builder)
  ds = _read_undecoded(builder, split).enumerate()
  if keep is not None:
    keep = tf.constant(keep, dtype=tf.bool)
    ds = ds.filter(lambda i, ex: tf.gather(keep, i))
  if noisy_labels is not None:
    noisy_labels = tf.constant(noisy_labels, dtype=tf.int32)
  image_feature = builder.info.features[image_key]

  def decode(index, ex):
    image = image_feature.decode_example(ex[image_key])
    true_label = tf.cast(ex[label_key], tf.int32)
    label = true_label if noisy_labels is None else tf.gather(noisy_labels, index)
    return {
        'image': _resize(image, size),
        'label': label,
        'true_label': true_label,
        'corrupted': tf.cast(label != true_label, tf.float32),
    }

  return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)


def _resize(image: tf.Tensor, size: tuple[int, int] | None) -> tf.Tensor:
  """Resizes uint8 (h, w, C) to uint8 (H, W, C); identity when already there."""
  if size is None or tuple(image.shape[:2]) == tuple(size):
    return image
  resized = tf.image.resize(image, size, method='bilinear', antialias=True)
  # Back to uint8 so that the cache holds a quarter of the bytes.
  resized = tf.clip_by_value(tf.round(resized), 0.0, 255.0)
  return tf.cast(resized, image.dtype)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """uint8 (..., H, W, C) in 0..255 → float32 `(x / 255 - 0.5) / 0.25`."""
  return (tf.cast(image, tf.float32) / 255.0 - _MEAN) / _STD


def crop_padding(height: int, width: int) -> int:
  """Pixels padded on each side before a random crop: 4, or size // 8 if small."""
  return max(1, min(MAX_CROP_PAD, min(height, width) // 8))


def augment_image(
    image: tf.Tensor, seed: tf.Tensor, *, augment: str, pad_mode: str = 'reflect'
) -> tf.Tensor:
  """Stateless random pad-and-crop and optional horizontal flip.

  Args:
    image: (H, W, C) image of any dtype, static shape.
    seed: int64 (2,) stateless seed of this example.
    augment: 'none', 'crop' or 'crop_flip'.
    pad_mode: 'reflect' or 'zero' padding before the crop.

  Returns:
    The augmented image, same shape and dtype.
  """
  _check_augment(augment)
  if augment == 'none':
    return image
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  height, width, channels = image.shape
  pad = crop_padding(height, width)
  padded = tf.pad(
      image, [[pad, pad], [pad, pad], [0, 0]], mode=PAD_MODES[pad_mode]
  )
  image = tf.image.stateless_random_crop(
      padded, (height, width, channels), seed=crop_seed
  )
  if augment == 'crop_flip':
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return image


def _shard_mask(size: int, indices: np.ndarray) -> np.ndarray:
  keep = np.zeros(size, dtype=bool)
  keep[indices] = True
  return keep


# ---------------------------------------------------------------------------
# Training.


def train_dataset(
    config: ml_collections.ConfigDict,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[tf.data.Dataset, int]:
  """Infinite, shuffled, augmented training batches of this process.

  The global stream (one shuffle per epoch of the whole training subset,
  batches of `batch_size`) is the same whatever the process count: process p
  yields rows [p * B, (p + 1) * B) of every global batch, B = batch_size //
  process_count, so the concatenation of the processes' batches in process
  order is the batch of a single process. Every process therefore reads and
  caches the whole subset (the benchmarks' subsets are small) but augments only
  its own rows. Augmentation uses stateless ops seeded by (seed, position in the
  global stream), so two calls with the same config yield identical batches.

  Args:
    config: the data config (see the module docstring).
    process_index: index of this process.
    process_count: number of processes; must divide `config.batch_size`.

  Returns:
    `(dataset, steps_per_epoch)`: dataset of `{'image': float32 (B, H, W, C),
    'label': int32 (B,)}` with B = batch_size // process_count, never ending
    (labels after `label_noise`); steps_per_epoch = max(1, ceil(subset size /
    batch_size)).
  """
  augment = _check_augment(_optional(config, 'augment', 'none'))
  pad_mode = _optional(config, 'pad_mode', 'reflect')
  local_batch = _per_process(config.batch_size, process_count, 'batch_size')
  builder = _builder_for(config)
  split = _train_split(config)
  subset, noisy_labels = _subset(config, builder)
  keep = _shard_mask(len(noisy_labels), subset)

  ds = _read_examples(
      builder, split, keep=keep, size=_target_size(config),
      noisy_labels=noisy_labels,
  )
  # Training needs only image and label: cache no more than that.
  ds = ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']}).cache()
  # Shuffle before repeat: each epoch is a full fresh permutation of the
  # subset, the same in every process (same seed, same input order).
  ds = ds.shuffle(
      max(1, len(subset)), seed=config.seed, reshuffle_each_iteration=True
  )
  ds = ds.repeat().enumerate()
  # This process's rows of each global batch, dropped before augmenting.
  ds = ds.filter(
      lambda position, ex: (position % config.batch_size) // local_batch
      == process_index
  )
  # The second word was once the process index: 0 keeps single-process
  # streams what they were.
  base_seed = tf.constant([config.seed, 0], dtype=tf.int64)

  def prepare(position, ex):
    seed = tf.random.experimental.stateless_fold_in(base_seed, position)
    image = augment_image(ex['image'], seed, augment=augment, pad_mode=pad_mode)
    return {'image': normalize(image), 'label': ex['label']}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
  steps_per_epoch = max(1, math.ceil(len(subset) / config.batch_size))
  return ds, steps_per_epoch


# ---------------------------------------------------------------------------
# Evaluation.


def _padded_batches(
    ds: tf.data.Dataset,
    *,
    num_examples: int,
    num_batches: int,
    batch_size: int,
    image_shape: Sequence[int],
) -> tf.data.Dataset:
  """Batches all `num_examples` elements, padding to `num_batches` full batches.

  Padding elements have a zero image, labels 0, corrupted 0 and mask 0; real
  ones mask 1.
  """
  ds = ds.map(lambda ex: {**ex, 'mask': tf.constant(1.0, tf.float32)})
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros(image_shape, tf.float32),
      'label': tf.constant(0, tf.int32),
      'true_label': tf.constant(0, tf.int32),
      'corrupted': tf.constant(0.0, tf.float32),
      'mask': tf.constant(0.0, tf.float32),
  }).repeat(num_batches * batch_size - num_examples)
  return ds.concatenate(padding).batch(batch_size, drop_remainder=True)


def _eval_pipeline(
    config: ml_collections.ConfigDict,
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    indices: np.ndarray,
    split_size: int,
    process_index: int,
    process_count: int,
    noisy_labels: np.ndarray | None = None,
) -> tf.data.Dataset:
  """Masked eval batches over `indices` of `split`, sharded over processes.

  The global batches (`indices` in order, padded at the end) are those of a
  single process; process p yields rows [p * B, (p + 1) * B) of each, B =
  eval_batch_size // process_count.
  """
  global_batch = _eval_batch_size(config)
  local_batch = _per_process(global_batch, process_count, 'eval_batch_size')
  # Every process runs the same number of batches, so a global step never waits.
  num_batches = math.ceil(len(indices) / global_batch)
  positions = np.arange(num_batches * global_batch)
  mine = positions[(positions % global_batch) // local_batch == process_index]
  # Ascending: this process's real examples come first, then its padding.
  shard = indices[mine[mine < len(indices)]]
  size = _target_size(config)
  keep = None
  if len(shard) != split_size:
    keep = _shard_mask(split_size, shard)
  ds = _read_examples(
      builder, split, keep=keep, size=size, noisy_labels=noisy_labels
  ).cache()
  ds = ds.map(lambda ex: {**ex, 'image': normalize(ex['image'])})
  ds = _padded_batches(
      ds,
      num_examples=len(shard),
      num_batches=num_batches,
      batch_size=local_batch,
      image_shape=_image_shape(builder, size),
  )
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_dataset(
    config: ml_collections.ConfigDict,
    *,
    split: str,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
  """The whole `split` once, in order, in masked fixed-size batches.

  Args:
    config: the data config (see the module docstring).
    split: TFDS split string, e.g. `config.test_split`.
    process_index: index of this process.
    process_count: number of processes; must divide the eval batch size.

  Returns:
    Finite dataset of `{'image': float32 (B, H, W, C), 'label': int32 (B,),
    'mask': float32 (B,), 'true_label': int32 (B,), 'corrupted': float32 (B,)}`
    with B = eval_batch_size // process_count; the last batches are padded
    (mask 0) so every example counts exactly once. Here `true_label` equals
    `label` and `corrupted` is 0: the fields exist so that eval batches of the
    test split and of the training subset share one structure (one compiled
    eval step).
  """
  builder = _builder_for(config)
  split_size = _split_size(builder, split)
  return _eval_pipeline(
      config,
      builder,
      split,
      indices=np.arange(split_size, dtype=np.int64),
      split_size=split_size,
      process_index=process_index,
      process_count=process_count,
  )


def eval_train_dataset(
    config: ml_collections.ConfigDict,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
  """The chosen training subset once, unaugmented, in masked batches.

  Same batches and fields as `eval_dataset`, over the examples that
  `train_dataset` trains on (for train accuracy), in split order. `label` is
  the label trained on (after `label_noise`), `true_label` the dataset's label
  and `corrupted` 1 where they differ, so that memorization of the corrupted
  labels can be measured.
  """
  builder = _builder_for(config)
  split = _train_split(config)
  subset, noisy_labels = _subset(config, builder)
  return _eval_pipeline(
      config,
      builder,
      split,
      indices=subset,
      split_size=len(noisy_labels),
      process_index=process_index,
      process_count=process_count,
      noisy_labels=noisy_labels,
  )
