"""The scikit-learn 8x8 handwritten digits as a local, offline TFDS dataset.

`sklearn.datasets.load_digits()` ships its 1,797 images inside the scikit-learn
wheel, so this builder never downloads anything: `download_and_prepare()` writes
the TFDS files into any `data_dir` on first use and later uses read them back.
That lets the embedded default config run through exactly the same TFDS /
tf.data pipeline as the real benchmarks.

Split (fixed, seed `SPLIT_SEED`): per class a fixed-seed permutation; its first
`TEST_PER_CLASS` (50) examples go to `test` (500), the rest to `train` (1,297).

Importing this module registers the builder under the TFDS name `digits`, so
`tfds.builder("digits", data_dir=...)` works as for any other dataset.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
TEST_PER_CLASS = 50
SPLIT_SEED = 0
# sklearn stores each pixel as a count of set bits in a 4x4 block: 0..16.
_MAX_RAW_VALUE = 16

_DESCRIPTION = """
The 1,797 8x8 grayscale handwritten digits (UCI Optical Recognition of
Handwritten Digits, test part) that ship with scikit-learn
(`sklearn.datasets.load_digits`). Pixels are rescaled from 0..16 to 0..255.
Split with a fixed seed: 50 examples of each class in `test` (500), the other
1,297 in `train`.
"""

_CITATION = """
@misc{alpaydin1998optical,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49},
}
"""


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Loads the digits from scikit-learn as TFDS-ready arrays.

  Returns:
    `(images, labels)`: images uint8 (1797, 8, 8, 1), pixel = round(v * 255 / 16);
    labels int64 (1797,) in 0..9.
  """
  # Imported here: scikit-learn is only needed when the dataset is prepared.
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  scaled = np.round(digits.images * (255.0 / _MAX_RAW_VALUE))
  images = scaled.astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  return images, labels


def split_indices(
    labels: np.ndarray, *, test_per_class: int = TEST_PER_CLASS, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
  """The fixed train/test split: `test_per_class` examples per class to test.

  Args:
    labels: int (N,) class of each example.
    test_per_class: examples of each class that go to test.
    seed: seed of the per-class permutations (one generator, classes in order).

  Returns:
    `(train, test)`: sorted int64 index arrays, disjoint, covering 0..N-1.
  """
  rng = np.random.default_rng(seed)
  test = []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    test.append(members[:test_per_class])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, built locally without download."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=IMAGE_SHAPE),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage=(
            "https://scikit-learn.org/stable/modules/generated/"
            "sklearn.datasets.load_digits.html"
        ),
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    images, labels = load_arrays()
    train, test = split_indices(labels)
    return {
        "train": self._generate_examples(images, labels, train),
        "test": self._generate_examples(images, labels, test),
    }

  def _generate_examples(
      self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
  ) -> Iterator[tuple[int, dict[str, np.ndarray | int]]]:
    # The sklearn index is a stable, unique key (TFDS orders examples by key hash).
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}
