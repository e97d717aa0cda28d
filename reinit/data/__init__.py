"""Input data: TFDS/tf.data pipelines and the embedded offline `digits` dataset.

Importing this package imports TensorFlow and TFDS (and hides GPUs from TF);
the library core (`import reinit`) never imports it.
"""

from reinit.data.digits import Digits
from reinit.data.pipeline import augment_image
from reinit.data.pipeline import AUGMENTATIONS
from reinit.data.pipeline import corrupt_labels
from reinit.data.pipeline import dataset_info
from reinit.data.pipeline import DatasetInfo
from reinit.data.pipeline import DatasetNotPreparedError
from reinit.data.pipeline import eval_dataset
from reinit.data.pipeline import eval_train_dataset
from reinit.data.pipeline import FOLDER_PREFIX
from reinit.data.pipeline import get_builder
from reinit.data.pipeline import normalize
from reinit.data.pipeline import num_corrupted
from reinit.data.pipeline import train_dataset
from reinit.data.pipeline import train_subset_indices

__all__ = [
    'AUGMENTATIONS',
    'DatasetInfo',
    'DatasetNotPreparedError',
    'Digits',
    'FOLDER_PREFIX',
    'augment_image',
    'corrupt_labels',
    'dataset_info',
    'eval_dataset',
    'eval_train_dataset',
    'get_builder',
    'normalize',
    'num_corrupted',
    'train_dataset',
    'train_subset_indices',
]
