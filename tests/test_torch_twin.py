"""The PyTorch twin (launch/torch_twin.py) has the layer shapes of our Flax models.

Skipped where torch is not installed (it is needed only for the GPU comparison).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reinit import models

torch = pytest.importorskip("torch")
from launch import torch_twin  # pylint: disable=g-import-not-at-top,wrong-import-position


def _flax_shapes(name, size, width):
  model = models.get_model(name, num_classes=10, width=width)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                             train=False))["params"]
  return sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(params))


def _torch_shapes(name, size, width):
  model = torch_twin.make_model(name, num_classes=10, image_size=size, width=width)
  shapes = []
  for p in model.parameters():
    shape = tuple(p.shape)
    if len(shape) == 4:  # OIHW -> Flax's HWIO
      shape = (shape[2], shape[3], shape[1], shape[0])
    elif len(shape) == 2:  # Linear (out, in) -> Dense (in, out)
      shape = shape[::-1]
    shapes.append(shape)
  return sorted(shapes)


@pytest.mark.parametrize("name,size,width", [("simple_cnn", 8, 0.25), ("simple_cnn", 32, 1.0),
                                             ("resnet18", 32, 0.25), ("resnet18", 72, 0.25)])
def test_twin_has_the_flax_models_parameter_shapes(name, size, width):
  assert _torch_shapes(name, size, width) == _flax_shapes(name, size, width)


def test_twin_resnet18_parameter_count():
  # reinit/models/resnet.py: 11,173,962 params at width 1, 10 classes, 32 px.
  model = torch_twin.make_model("resnet18", num_classes=10, image_size=32, width=1.0)
  assert sum(p.numel() for p in model.parameters()) == 11_173_962


def test_twin_runs_and_reports_one_json_line(capsys):
  torch_twin.main(["--model=simple_cnn", "--batch_size=4", "--image_size=8", "--width=0.25",
                   "--runs=2", "--steps=1"])
  import json  # pylint: disable=g-import-not-at-top
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert line["runs"] == 2 and line["images_per_s"] > 0 and line["flops_per_image"] > 0
  assert np.isfinite(line["step_ms"])
