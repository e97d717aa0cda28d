"""reinit: reinitialization during training of convolutional networks, in JAX/Flax.

The public library API: pure functions over pytrees of arrays (linen `variables`, `params`, NNX
`State`) and optax states. Importing `reinit` imports no TensorFlow, TFDS, clu or orbax; the
trainer (`reinit.train`), the data pipeline (`reinit.data`) and the report live in submodules
imported on demand.
"""

from reinit.transforms import magnitude_mask
from reinit.transforms import random_mask
from reinit.transforms import reinitialize
from reinit.transforms import rescale
from reinit.transforms import reset_opt_state
from reinit.transforms import shrink_perturb
from reinit.tree import layer_order
from reinit.tree import paths
from reinit.tree import select

__all__ = [
    "layer_order",
    "magnitude_mask",
    "paths",
    "random_mask",
    "reinitialize",
    "rescale",
    "reset_opt_state",
    "select",
    "shrink_perturb",
]

__version__ = "0.1.0"
