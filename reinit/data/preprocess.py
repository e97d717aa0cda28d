"""Reading a split's examples in their fixed order, resizing, normalizing and augmenting.

The building blocks of `reinit.data.pipeline`: examples and labels of a split are read through
one function (`_read_undecoded`) so that they line up index by index; augmentation is stateless,
seeded per example.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# First: hides GPUs from TensorFlow before anything initializes TF's runtime.
from reinit.data import builders
from reinit.data.registry import AUGMENTATIONS

PAD_MODES = {"reflect": "REFLECT", "zero": "CONSTANT"}
# Largest padding before a random crop; small images use size // 8 instead.
MAX_CROP_PAD = 4
_MEAN, _STD = 0.5, 0.25


def _read_undecoded(
    builder: tfds.core.DatasetBuilder, split: str
) -> tf.data.Dataset:
  """`split` in its fixed order: `{image_key: encoded bytes, label_key: int}`.

  Labels and examples are both read through this one function so that they
  line up index by index (under `tfds.testing.mock_data` the random examples
  even depend on which features are decoded).
  """
  image_key, label_key = builders.supervised_keys(builder)
  # Decode the image after filtering, so that dropped examples cost nothing.
  skip_image = {image_key: tfds.decode.SkipDecoding()}
  if builders.is_folder(builder):
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


def read_labels(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
  """Labels int64 (N,) of `split` in its read order, images left undecoded."""
  _, label_key = builders.supervised_keys(builder)
  ds = _read_undecoded(builder, split).map(lambda ex: ex[label_key]).batch(8192)
  batches = [np.asarray(b, dtype=np.int64) for b in tfds.as_numpy(ds)]
  return np.concatenate(batches) if batches else np.zeros((0,), np.int64)



def _read_config() -> tfds.ReadConfig:
  # We cache ourselves, after filtering and resizing.
  return tfds.ReadConfig(try_autocache=False)


def options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def read_examples(
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
    Dataset of `{"image": uint8 (H, W, C), "label": int32 (), "true_label":
    int32 (), "corrupted": float32 ()}`; `corrupted` is 1 where `label` differs
    from `true_label`.
  """
  image_key, label_key = builders.supervised_keys(builder)
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
        "image": _resize(image, size),
        "label": label,
        "true_label": true_label,
        "corrupted": tf.cast(label != true_label, tf.float32),
    }

  return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)


def _resize(image: tf.Tensor, size: tuple[int, int] | None) -> tf.Tensor:
  """Resizes uint8 (h, w, C) to uint8 (H, W, C); identity when already there."""
  if size is None or tuple(image.shape[:2]) == tuple(size):
    return image
  resized = tf.image.resize(image, size, method="bilinear", antialias=True)
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
    image: tf.Tensor, seed: tf.Tensor, *, augment: str, pad_mode: str = "reflect"
) -> tf.Tensor:
  """Stateless random pad-and-crop and optional horizontal flip.

  Args:
    image: (H, W, C) image of any dtype, static shape.
    seed: int64 (2,) stateless seed of this example.
    augment: "none", "crop" or "crop_flip".
    pad_mode: "reflect" or "zero" padding before the crop.

  Returns:
    The augmented image, same shape and dtype.
  """
  check_augment(augment)
  if augment == "none":
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
  if augment == "crop_flip":
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return image


def check_augment(augment: str) -> str:
  if augment not in AUGMENTATIONS:
    raise ValueError(f"augment={augment!r}; expected one of {AUGMENTATIONS}.")
  return augment


def shard_mask(size: int, indices: np.ndarray) -> np.ndarray:
  keep = np.zeros(size, dtype=bool)
  keep[indices] = True
  return keep


# ---------------------------------------------------------------------------
# Training.
