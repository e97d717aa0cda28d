"""The benchmark datasets: for each key, the TFDS name, splits and data config fields it sets.

Pure Python (no TensorFlow, TFDS or numpy), so that configs and machines without TensorFlow
(the GPU benchmark) can import it. `configs/benchmark.py` fills a run's config from it.
"""

from typing import NamedTuple

# Training-time augmentations (`augment`): none, random crop with padding, crop and flip.
AUGMENTATIONS = ("none", "crop", "crop_flip")


class Benchmark(NamedTuple):
  """One benchmark dataset: the config fields it sets, then TFDS metadata (hints only).

  The hints document the README table and are checked by tests/test_benchmarks.py against the
  installed TFDS builders (classes, native shape); the pipeline always reads classes and shapes
  from the builder itself. Split sizes are those of the TFDS 4.9.10 catalog for the split
  strings below (`train[:80%]` of 27,000 is 21,600).
  """
  tfds_name: str
  train_split: str
  test_split: str
  image_size: int | None           # None keeps the native size
  augment: str                     # none, crop (no flip: digits) or crop_flip
  train_examples: int | None       # default subset size; None: the whole train split
  num_classes: int | None = None
  native_shape: tuple | None = None  # (H, W, C); None where H and W vary per image
  train_size: int | None = None
  test_size: int | None = None


_VARIABLE = (None, None, 3)
DATASETS = {
    "digits": Benchmark("digits", "train", "test", None, "none", 200,
                        10, (8, 8, 1), 1297, 500),
    "cifar10": Benchmark("cifar10", "train", "test", 32, "crop_flip", None,
                         10, (32, 32, 3), 50000, 10000),
    "cifar100": Benchmark("cifar100", "train", "test", 32, "crop_flip", None,
                          100, (32, 32, 3), 50000, 10000),
    "svhn": Benchmark("svhn_cropped", "train", "test", 32, "crop", None,
                      10, (32, 32, 3), 73257, 26032),
    "fashion_mnist": Benchmark("fashion_mnist", "train", "test", 32, "crop_flip", None,
                               10, (28, 28, 1), 60000, 10000),
    # 101 object classes plus the BACKGROUND_Google clutter class; 30 train images per class.
    "caltech101": Benchmark("caltech101", "train", "test", 64, "crop_flip", None,
                            102, _VARIABLE, 3060, 6084),
    "birds": Benchmark("caltech_birds2011", "train", "test", 64, "crop_flip", None,
                       200, _VARIABLE, 5994, 5794),
    # TFDS's dtd splits are fold 1 of the official 10 folds (1,880 images each).
    "dtd": Benchmark("dtd", "train+validation", "test", 64, "crop_flip", None,
                     47, _VARIABLE, 3760, 1880),
    "flowers": Benchmark("oxford_flowers102", "train+validation", "test", 64, "crop_flip", None,
                         102, _VARIABLE, 2040, 6149),
    "pets": Benchmark("oxford_iiit_pet", "train", "test", 64, "crop_flip", None,
                      37, _VARIABLE, 3680, 3669),
    "dogs": Benchmark("stanford_dogs", "train", "test", 64, "crop_flip", None,
                      120, _VARIABLE, 12000, 8580),
    # One TFDS split only (27,000 images): its first 80% trains, the rest tests.
    "eurosat": Benchmark("eurosat/rgb", "train[:80%]", "train[80%:]", 64, "crop_flip", None,
                         10, (64, 64, 3), 21600, 5400),
    # One TFDS split only (5,000 images).
    "colorectal": Benchmark("colorectal_histology", "train[:80%]", "train[80%:]", 64,
                            "crop_flip", None, 8, (150, 150, 3), 4000, 1000),
}


