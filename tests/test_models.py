"""Tests of the model zoo: shapes, LW units and their order, the `norm` collection, sizes.

Small widths and images keep real forward passes cheap; everything that only needs shapes
(parameter counts, unit order, the stem choice) runs under `jax.eval_shape`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reinit.models import MODELS, NORM_COLLECTION, get_model

NUM_CLASSES = 10
SMALL_WIDTH = 0.125

# Expected LW units of each model, bottom-up.
UNITS = {
    "simple_cnn": [f"block{i}" for i in range(6)] + ["head"],
    "vgg16": [f"block{i}" for i in range(13)] + ["head"],
    "resnet18": ["stem"] + [f"block{i}" for i in range(8)] + ["head"],
    "resnet50": ["stem"] + [f"block{i}" for i in range(16)] + ["head"],
}


# Each test program runs once or twice on tiny inputs, so XLA's CPU optimizations cost far more
# time than they save (about 3x in compile time, mostly in the initializers' random numbers).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile(fun, *args):
  """`jax.jit(fun)` compiled for exactly these argument shapes, with `FAST_COMPILE`."""
  return jax.jit(fun).lower(*args).compile(FAST_COMPILE)


def _images(size=32, batch=2, seed=0):
  """(batch, size, size, 3) float32 images."""
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


def _abstract_variables(model, x):
  """Shapes/dtypes of `model.init(key, x)` without running it."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def _unit_order(model, x):
  """Top-level submodule names in the order the forward pass first calls them."""
  order = []

  def record(next_fun, args, kwargs, context):
    path = context.module.path
    if len(path) == 1 and path[0] not in order:
      order.append(path[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _abstract_variables(model, x)
  return order


@functools.cache
def _built(name):
  """A small model, its 32 px input, initialized variables and a jitted eval-mode apply.

  The apply also returns the output of every top-level unit (captured intermediates), so the
  tests below share one compiled program per model: compiling dominates their run time.
  """
  model = get_model(name, num_classes=NUM_CLASSES, width=SMALL_WIDTH)
  x = _images()
  key = jax.random.key(0)
  variables = _compile(model.init, key, x)(key, x)

  def apply_eval(variables, x):
    logits, state = model.apply(
        variables, x, train=False, mutable=["intermediates"],
        capture_intermediates=lambda mdl, method: len(mdl.path) == 1 and method == "__call__")
    units = {unit: out["__call__"][0] for unit, out in state["intermediates"].items()}
    return logits, units

  return model, x, variables, _compile(apply_eval, variables, x)


def _num_params(variables):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


def test_registry():
  assert sorted(MODELS) == sorted(UNITS)
  with pytest.raises(ValueError, match="resnet18"):
    get_model("resnet19", num_classes=NUM_CLASSES)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_logits_train_and_eval(name):
  model, x, variables, apply_eval = _built(name)
  apply_train = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  logits, updates = _compile(apply_train, variables, x)(variables, x)
  eval_logits, units = apply_eval(variables, x)
  for out in (logits, eval_logits):
    assert out.shape == (2, NUM_CLASSES)
    assert out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
  assert sorted(units) == sorted(UNITS[name])
  # Train mode updates the running statistics (momentum 0.9) and nothing else.
  assert set(updates) == {"batch_stats"}
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))
  # Every Standardize starts as the identity: inactive, mean 0, variance 1.
  for entry in variables[NORM_COLLECTION].values():
    assert float(entry["Standardize_0"]["active"]) == 0.0
    np.testing.assert_array_equal(entry["Standardize_0"]["mean"], 0.0)
    np.testing.assert_array_equal(entry["Standardize_0"]["var"], 1.0)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_and_order(name):
  model = get_model(name, num_classes=NUM_CLASSES, width=SMALL_WIDTH)
  x = _images()
  variables = _abstract_variables(model, x)
  assert sorted(variables["params"]) == sorted(UNITS[name])
  assert _unit_order(model, x) == UNITS[name]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_norm_collection(name):
  """Every unit but the head has an inactive Standardize sized to the unit's output channels."""
  model = get_model(name, num_classes=NUM_CLASSES, width=SMALL_WIDTH)
  x = _images()
  out_channels = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if len(context.module.path) == 1 and context.method_name == "__call__":
      out_channels[context.module.path[0]] = out.shape[-1]
    return out

  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  norm = variables[NORM_COLLECTION]
  assert sorted(norm) == sorted(UNITS[name][:-1])
  for unit in UNITS[name][:-1]:
    entry = norm[unit]["Standardize_0"]
    assert entry["active"].shape == ()
    assert entry["mean"].shape == entry["var"].shape == (out_channels[unit],)
    assert {leaf.dtype for leaf in entry.values()} == {jnp.dtype("float32")}


@pytest.mark.parametrize("name,unit", [("simple_cnn", "block1"), ("vgg16", "block3"),
                                       ("resnet18", "stem"), ("resnet50", "block2")])
def test_active_standardize_is_exact_at_its_boundary(name, unit):
  """With active=1, the unit outputs (x - mean) / sqrt(var + 1e-5) of what it output before."""
  _, x, variables, apply_eval = _built(name)
  channels = variables[NORM_COLLECTION][unit]["Standardize_0"]["mean"].shape[0]
  mean = jax.random.normal(jax.random.key(1), (channels,))
  var = jax.random.uniform(jax.random.key(2), (channels,), minval=0.1, maxval=3.0)
  switched = jax.tree.map(lambda a: a, variables)  # new dicts, same leaves
  switched[NORM_COLLECTION][unit]["Standardize_0"] = {
      "active": jnp.ones(()), "mean": mean, "var": var}
  # Same shapes, so the same compiled program: switching is a value change, not a new program.
  logits, units = apply_eval(variables, x)
  switched_logits, switched_units = apply_eval(switched, x)
  np.testing.assert_allclose(switched_units[unit], (units[unit] - mean) / jnp.sqrt(var + 1e-5),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(switched_logits, logits)
  # Units below the boundary are untouched.
  for below in UNITS[name][:UNITS[name].index(unit)]:
    np.testing.assert_array_equal(switched_units[below], units[below])


@pytest.mark.parametrize("name,expected", [
    ("resnet18", 11_173_962),  # CIFAR ResNet18 (e.g. kuangliu/pytorch-cifar)
    ("resnet50", 23_520_842),  # CIFAR ResNet50
    ("vgg16", 14_728_266),  # CIFAR VGG16-BN, Dense head on the 512 pooled features
])
def test_parameter_counts(name, expected):
  model = get_model(name, num_classes=NUM_CLASSES)
  count = _num_params(_abstract_variables(model, jnp.zeros((1, 32, 32, 3))))
  assert abs(count - expected) <= 0.01 * expected, count


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_stem_follows_image_size(name):
  model = get_model(name, num_classes=NUM_CLASSES)
  for size, kernel, stem_out in ((32, 3, 32), (64, 3, 64), (224, 7, 56)):
    x = jnp.zeros((1, size, size, 3))
    shapes = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.module.path == ("stem",) and context.method_name == "__call__":
        shapes["stem"] = out.shape
      return out

    with nn.intercept_methods(record):
      variables = _abstract_variables(model, x)
    assert variables["params"]["stem"]["conv"]["kernel"].shape == (kernel, kernel, 3, 64)
    assert shapes["stem"] == (1, stem_out, stem_out, 64)
  # An explicit choice overrides the image size.
  forced = get_model(name, num_classes=NUM_CLASSES, stem="imagenet")
  variables = _abstract_variables(forced, jnp.zeros((1, 32, 32, 3)))
  assert variables["params"]["stem"]["conv"]["kernel"].shape == (7, 7, 3, 64)


def test_vgg_classifier_follows_image_size():
  model = get_model("vgg16", num_classes=NUM_CLASSES, width=SMALL_WIDTH)
  small = _abstract_variables(model, jnp.zeros((1, 32, 32, 3)))["params"]["head"]
  assert small["kernel"].shape == (64, NUM_CLASSES)  # GAP + one Dense
  large = _abstract_variables(model, jnp.zeros((1, 224, 224, 3)))["params"]["head"]
  assert large["Dense_0"]["kernel"].shape == (7 * 7 * 64, 512)  # the original classifier
  assert large["Dense_2"]["kernel"].shape == (512, NUM_CLASSES)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual(name):
  # One block per stage is enough (each stage's first block has the projection shortcut).
  model = get_model(name, num_classes=NUM_CLASSES, width=SMALL_WIDTH, stage_sizes=(1, 1, 1, 1),
                    zero_init_residual=True)
  key, x = jax.random.key(0), _images(size=8)
  params = _compile(model.init, key, x)(key, x)["params"]
  last_bn = "bn2" if name == "resnet18" else "bn3"
  blocks = [unit for unit in params if unit.startswith("block")]
  assert len(blocks) == 4
  for unit in blocks:
    np.testing.assert_array_equal(params[unit][last_bn]["scale"], 0.0)
    np.testing.assert_array_equal(params[unit]["bn1"]["scale"], 1.0)
    if "shortcut_bn" in params[unit]:
      np.testing.assert_array_equal(params[unit]["shortcut_bn"]["scale"], 1.0)


@pytest.mark.parametrize("name,projected", [("resnet18", ["block2", "block4", "block6"]),
                                            ("resnet50", ["block0", "block3", "block7", "block13"])])
def test_projection_shortcuts_where_shape_changes(name, projected):
  model = get_model(name, num_classes=NUM_CLASSES)
  params = _abstract_variables(model, jnp.zeros((1, 32, 32, 3)))["params"]
  assert [unit for unit in UNITS[name] if "shortcut_conv" in params[unit]] == projected
  for unit in projected:
    assert params[unit]["shortcut_conv"]["kernel"].shape[:2] == (1, 1)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = get_model("resnet18", num_classes=NUM_CLASSES, width=SMALL_WIDTH, dtype=jnp.bfloat16)
  x = _images(size=8)
  variables = _abstract_variables(model, x)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {jnp.dtype("float32")}
  logits = jax.eval_shape(model.apply, variables, x)
  assert logits.dtype == jnp.float32 and logits.shape == (2, NUM_CLASSES)
  # The compute really is bfloat16: the units' outputs are.
  _, state = jax.eval_shape(lambda v, x: model.apply(
      v, x, mutable=["intermediates"],
      capture_intermediates=lambda mdl, method: mdl.path == ("block0",)), variables, x)
  assert state["intermediates"]["block0"]["__call__"][0].dtype == jnp.bfloat16


def test_vgg_adaptive_pool_matches_torchvision_bins():
  from reinit.models.vgg import adaptive_avg_pool
  x = jax.random.normal(jax.random.key(0), (1, 14, 14, 2))
  np.testing.assert_allclose(adaptive_avg_pool(x[:, :7, :7]), x[:, :7, :7], rtol=1e-6)
  np.testing.assert_allclose(adaptive_avg_pool(x), nn.avg_pool(x, (2, 2), (2, 2)), rtol=1e-5,
                             atol=1e-6)
  # A smaller map is repeated into the 7x7 grid (96 px images end at 3x3).
  small = adaptive_avg_pool(x[:, :3, :3])
  assert small.shape == (1, 7, 7, 2)
  np.testing.assert_allclose(small[0, 0, 0], x[0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(small[0, 6, 6], x[0, 2, 2], rtol=1e-6)


@pytest.mark.parametrize("name", ["simple_cnn", "resnet18"])
def test_im2col_convolution_computes_what_xla_does(name):
  # Strided, padded ('SAME' and explicit) and 1x1 convolutions all occur in these models.
  # (vgg16's are simple_cnn's; at 16 px its training-mode BatchNorms over 1x1 maps of two
  # images amplify float rounding past any useful tolerance: its forward pass is checked below.)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  xla = get_model(name, num_classes=10, width=0.25)
  im2col = get_model(name, num_classes=10, width=0.25, conv="im2col")
  variables = xla.init(jax.random.key(1), x, train=False)

  def loss(model, params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
    return jnp.mean(jnp.square(logits))
  # Jitted: op by op, resnet18's forward and backward take tens of seconds of dispatch.
  expected, expected_grads = jax.jit(jax.value_and_grad(lambda p: loss(xla, p)))(
      variables["params"])
  value, grads = jax.jit(jax.value_and_grad(lambda p: loss(im2col, p)))(variables["params"])
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_im2col_vgg16_evaluates_as_xla_does():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  xla = get_model("vgg16", num_classes=10, width=0.25)
  variables = xla.init(jax.random.key(1), x, train=False)
  np.testing.assert_allclose(
      get_model("vgg16", num_classes=10, width=0.25, conv="im2col").apply(variables, x),
      xla.apply(variables, x), rtol=1e-4, atol=1e-5)


def test_im2col_refuses_what_it_does_not_compute():
  from reinit.models import conv  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="conv='xla'"):
    conv.im2col_conv(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 4)), (1, 1), "SAME",
                     rhs_dilation=(2, 2))
  with pytest.raises(ValueError, match="conv='nope' is unknown"):
    conv.conv_layer("nope", 4, (3, 3))
