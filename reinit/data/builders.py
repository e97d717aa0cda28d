"""TFDS builders of the configured datasets: resolved offline, never downloading.

`digits` is built locally from scikit-learn on first use; any other TFDS dataset must already
be prepared in the data dir (`tfds build NAME --data_dir=DIR`); `folder:ROOT` reads a folder of
images per class through `tfds.folder_dataset.ImageFolder`. Also what a builder's metadata says
about classes, split sizes and image shapes.

Importing this module hides GPUs from TensorFlow, so that TF leaves accelerator memory to JAX.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

# Imported for its side effect: registers the local `digits` builder with TFDS.
from reinit.data import digits  # pylint: disable=unused-import  # noqa: F401


def _hide_gpus_from_tf() -> None:
  # TF would otherwise pre-allocate most of the GPU memory that JAX needs.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    # TF's runtime was already initialized by the importer: too late to
    # change, and not ours to change.
    pass


_hide_gpus_from_tf()

_LOCAL_DATASETS = ("digits",)
FOLDER_PREFIX = "folder:"


class DatasetNotPreparedError(ValueError):
  """A TFDS dataset is not prepared in the data dir (and is never downloaded)."""


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
        f"dataset={dataset!r} is unknown (data_dir={data_dir!r}); accepted: a key of "
        "reinit/data/registry.py DATASETS (e.g. digits, cifar10, flowers) or a TFDS name "
        "(tfds.list_builders())"
    ) from None
  if builder.is_prepared():
    return builder
  if builder.name in _LOCAL_DATASETS:
    _prepare_local(builder)
    # A fresh builder reads the metadata of the files just written.
    return tfds.builder(dataset, data_dir=data_dir)
  root = builder.data_dir_root
  raise DatasetNotPreparedError(
      f"Dataset {dataset!r} is not prepared in data_dir {str(root)!r} and is "
      f"never downloaded here; prepare it with: "
      f"tfds build {dataset} --data_dir={root}"
  )


def _folder_builder(root: str) -> tfds.folder_dataset.ImageFolder:
  """`ImageFolder` over ROOT/SPLIT/CLASS/*.png|jpg; classes: sorted CLASS names."""
  accepted = "folder:ROOT with ROOT/SPLIT/CLASS/*.png|jpg"
  if not root or not tf.io.gfile.isdir(root):
    raise ValueError(
        f"dataset={FOLDER_PREFIX + root!r}: {root!r} is not a directory; "
        f"accepted: {accepted}"
    )
  builder = tfds.folder_dataset.ImageFolder(root)
  if not builder.info.splits or not builder.info.features["label"].num_classes:
    raise ValueError(
        f"dataset={FOLDER_PREFIX + root!r} holds no images in SPLIT/CLASS "
        f"folders; accepted: {accepted}"
    )
  return builder


def is_folder(builder: tfds.core.DatasetBuilder) -> bool:
  return isinstance(builder, tfds.folder_dataset.ImageFolder)


def _prepare_local(builder: tfds.core.DatasetBuilder) -> None:
  """Builds a local (download-free) dataset such as `digits` into its data dir."""
  try:
    builder.download_and_prepare()
  except Exception:  # pylint: disable=broad-except
    # Several processes may prepare at once; only one rename wins, and that is
    # fine as long as the data ends up there.
    if not builder.is_prepared():
      raise


def supervised_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  """(image feature, label feature) names: the builder's supervised keys, or image, label."""
  keys = builder.info.supervised_keys
  if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys
  return "image", "label"


def num_classes(builder: tfds.core.DatasetBuilder) -> int:
  return builder.info.features[supervised_keys(builder)[1]].num_classes


def split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Number of examples `as_dataset(split)` yields (sub-splits understood)."""
  if is_folder(builder) and split not in builder.info.splits:
    # ImageFolder has no sub-split API: name the field's accepted values.
    raise ValueError(
        f"split {split!r} is not a folder of {builder.data_dir!r}; accepted "
        f"(train_split, test_split): {', '.join(builder.info.splits)}"
    )
  # The dataset's cardinality is what will actually be read; under
  # `tfds.testing.mock_data` it differs from the recorded split sizes.
  cardinality = int(builder.as_dataset(split=split).cardinality())
  if cardinality >= 0:
    return cardinality
  return builder.info.splits[split].num_examples


def image_shape(
    builder: tfds.core.DatasetBuilder, size: tuple[int, int] | None
) -> tuple[int, int, int]:
  """(H, W, C) of the images after resizing to `size` (None = native)."""
  native = builder.info.features[supervised_keys(builder)[0]].shape
  height, width = size if size is not None else native[:2]
  if height is None or width is None:
    name = builder.name
    if is_folder(builder):
      name = FOLDER_PREFIX + builder.data_dir
    raise ValueError(
        f"image_size=None is invalid for {name!r}, whose images have no fixed "
        f"size {tuple(native)}; accepted: an int or (height, width)"
    )
  return int(height), int(width), int(native[-1])
