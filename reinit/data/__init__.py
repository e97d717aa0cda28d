"""Input data: the `Data` object of a run, over TFDS/tf.data and the embedded `digits`.

Modules: `registry` (the benchmark datasets, pure Python), `subsets` (training subset and label
noise, numpy), `builders` (TFDS builders, offline), `preprocess` (reading, resizing,
augmentation), `pipeline` (the train and eval pipelines and `Data`), `digits`.

Importing this package imports nothing heavy: the names below load their module (and with it
TensorFlow and TFDS, hiding GPUs from TF) on first access, so that `reinit.data.registry` serves
machines without TensorFlow. The library core (`import reinit`) never imports this package.
"""

import importlib

# name -> module of reinit.data that defines it.
_EXPORTS = {
    "Data": "pipeline",
    "DatasetInfo": "pipeline",
    "AUGMENTATIONS": "registry",
    "augment_image": "preprocess",
    "normalize": "preprocess",
    "DatasetNotPreparedError": "builders",
    "FOLDER_PREFIX": "builders",
    "get_builder": "builders",
    "Digits": "digits",
    "corrupt_labels": "subsets",
    "num_corrupted": "subsets",
    "train_subset_indices": "subsets",
    "Benchmark": "registry",
    "DATASETS": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  globals()[name] = value  # later accesses skip this function
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
