"""Tests of the analyses against exact values: margins by hand, conv spectral norms against the
operator's dense matrix, BN folding against the eval-mode forward, flatness at sigma = 0, the
Hessian's top eigenvalue against `jax.hessian`, layer robustness, memorization counts, and
`launch.analyze` end to end on a tiny model (with label-noise fields) and its CLI errors."""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
from flax.core import unfreeze
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from reinit import analysis
from reinit import workdir as workdir_lib
from reinit.models import get_model, Standardize

REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ margins


def test_logit_margins_by_hand():
  logits = jnp.array([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0], [2.0, 2.0, 1.0]])
  labels = jnp.array([1, 0, 0])
  # 3 - max(1, 2); 0 - max(0, 5); a tie with another class is a zero margin.
  np.testing.assert_allclose(analysis.logit_margins(logits, labels), [1.0, -5.0, 0.0])


class TinyNet(nn.Module):
  """conv 2x2 (1 -> 2 channels, VALID) - ReLU - flatten - Dense(3). (N, 3, 3, 1) -> (N, 3)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(2, (2, 2), padding="VALID", use_bias=False)(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def test_margins_of_a_tiny_network_by_hand():
  x = np.arange(18, dtype=np.float32).reshape(2, 3, 3, 1) / 10.0 - 0.5
  conv = np.zeros((2, 2, 1, 2), np.float32)
  conv[..., 0, 0] = [[1.0, 0.0], [0.0, -1.0]]  # x[i, j] - x[i+1, j+1]
  conv[..., 0, 1] = [[0.5, 0.5], [0.5, 0.5]]   # half the 2x2 sum
  dense = np.linspace(-1.0, 1.0, 8 * 3, dtype=np.float32).reshape(8, 3)
  bias = np.array([0.1, -0.2, 0.3], np.float32)
  variables = {"params": {"Conv_0": {"kernel": conv},
                          "Dense_0": {"kernel": dense, "bias": bias}}}
  logits = TinyNet().apply(variables, x)

  expected = []
  for image in x[..., 0]:
    features = []
    for i in range(2):
      for j in range(2):
        patch = image[i:i + 2, j:j + 2]
        features.append([max(patch[0, 0] - patch[1, 1], 0.0), max(0.5 * patch.sum(), 0.0)])
    expected.append(np.array(features).reshape(-1) @ dense + bias)
  expected = np.array(expected)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  labels = np.array([2, 0])
  by_hand = [expected[0, 2] - max(expected[0, 0], expected[0, 1]),
             expected[1, 0] - max(expected[1, 1], expected[1, 2])]
  np.testing.assert_allclose(analysis.logit_margins(logits, labels), by_hand, rtol=1e-5)

  layers = analysis.find_linear_layers(TinyNet(), variables, x[:1])
  assert [(l.path, l.kind, l.input_shape, l.batchnorm) for l in layers] == [
      ("Conv_0", "conv", (3, 3, 1), None), ("Dense_0", "dense", (8,), None)]
  norms = analysis.layer_norms(layers, variables, iterations=300)
  np.testing.assert_allclose(norms[1]["spectral"], np.linalg.svd(dense, compute_uv=False)[0],
                             rtol=1e-5)
  np.testing.assert_allclose(norms[1]["frobenius"], np.linalg.norm(dense), rtol=1e-6)
  product = norms[0]["spectral"] * norms[1]["spectral"]
  np.testing.assert_allclose(analysis.normalize_margins(by_hand, [n["spectral"] for n in norms]),
                             np.array(by_hand) / product, rtol=1e-5)


def test_margin_statistics():
  stats = analysis.margin_statistics([-1.0, 0.0, 1.0, 2.0, 3.0])
  assert stats["examples"] == 5 and stats["median"] == 1.0 and stats["mean"] == 1.0
  assert stats["fraction_nonpositive"] == pytest.approx(0.4)


# ------------------------------------------------------------------ spectral norms and BN


def _operator_matrix(apply, input_shape) -> np.ndarray:
  """The dense matrix (out_size, in_size) of a linear map, column j = apply(e_j)."""
  size = int(np.prod(input_shape))
  basis = jnp.eye(size).reshape((size, *input_shape))
  return np.asarray(jax.vmap(lambda e: apply(e[None]).reshape(-1))(basis)).T


@pytest.mark.parametrize("conv_fields", [
    dict(strides=(1, 1), padding="SAME"),
    dict(strides=(2, 2), padding=((1, 1), (1, 1))),
    dict(strides=(1, 1), padding="CIRCULAR"),
])
def test_conv_spectral_norm_matches_the_operator_matrix(conv_fields):
  kernel = jax.random.normal(jax.random.key(3), (3, 3, 2, 3))
  matrix = _operator_matrix(analysis.conv_operator(kernel, **conv_fields), (4, 4, 2))
  exact = np.linalg.svd(matrix, compute_uv=False)[0]
  estimate = analysis.conv_spectral_norm(kernel, (4, 4, 2), iterations=1000, **conv_fields)
  np.testing.assert_allclose(estimate, exact, rtol=1e-4)


class ConvBN(nn.Module):
  """conv 3x3 (bias) -> BatchNorm -> Standardize. (N, 4, 4, 2) -> (N, 4, 4, 3)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(3, (3, 3), padding="SAME", use_bias=True)(x)
    x = nn.BatchNorm(use_running_average=not train, epsilon=1e-3)(x)
    return Standardize()(x)


def _random_like(tree, key, low=0.5, high=1.5):
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [
      jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(l), minval=low, maxval=high)
      for i, l in enumerate(leaves)])


def test_batchnorm_folding_matches_the_eval_forward():
  model = ConvBN()
  x = jax.random.normal(jax.random.key(1), (5, 4, 4, 2))
  variables = unfreeze(model.init(jax.random.key(0), x))
  variables["params"] = _random_like(variables["params"], jax.random.key(2), -1.0, 1.0)
  variables["batch_stats"] = _random_like(variables["batch_stats"], jax.random.key(3))
  layers = analysis.find_linear_layers(model, variables, x[:1])
  assert [(l.path, l.kind, l.batchnorm, l.bn_epsilon) for l in layers] == [
      ("Conv_0", "conv", "BatchNorm_0", 1e-3), ("Standardize_0", "standardize", None, 0.0)]

  conv, bn = variables["params"]["Conv_0"], variables["params"]["BatchNorm_0"]
  stats = variables["batch_stats"]["BatchNorm_0"]
  kernel, bias = analysis.fold_batchnorm(conv["kernel"], conv["bias"], scale=bn["scale"],
                                         offset=bn["bias"], mean=stats["mean"],
                                         var=stats["var"], epsilon=1e-3)
  folded = nn.Conv(3, (3, 3), padding="SAME").apply(
      {"params": {"kernel": kernel, "bias": bias}}, x)
  np.testing.assert_allclose(folded, model.apply(variables, x), rtol=1e-5, atol=1e-5)
  _, kernel_again = analysis.folded_kernel(layers[0], variables)
  np.testing.assert_allclose(kernel_again, kernel, rtol=1e-6)


def test_active_standardization_counts_in_the_spectral_product():
  model = ConvBN()
  x = jnp.ones((1, 4, 4, 2))
  variables = unfreeze(model.init(jax.random.key(0), x))
  layers = analysis.find_linear_layers(model, variables, x)
  assert analysis.layer_norms(layers, variables)[1]["spectral"] == 1.0
  variables["norm"]["Standardize_0"] = {"active": jnp.ones(()), "mean": jnp.zeros(3),
                                        "var": jnp.array([0.25, 1.0, 4.0])}
  norms = analysis.layer_norms(layers, variables)
  np.testing.assert_allclose(norms[1]["spectral"], 1 / np.sqrt(0.25 + 1e-5), rtol=1e-6)
  assert norms[1]["frobenius"] is None
  summary = analysis.norm_summary(norms)
  np.testing.assert_allclose(summary["log10_product_spectral"],
                             np.log10(norms[0]["spectral"] * norms[1]["spectral"]), rtol=1e-6)
  assert summary["sum_frobenius"] == pytest.approx(norms[0]["frobenius"])


def test_our_models_pair_each_conv_with_its_batchnorm():
  x = jnp.zeros((1, 16, 16, 3))

  def pairs(name):
    model = get_model(name, num_classes=10, width=0.125)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    layers = analysis.find_linear_layers(model, variables, x, train=False)
    return {l.path: l.batchnorm for l in layers if l.kind != "standardize"}

  simple = pairs("simple_cnn")
  assert simple["block0/Conv_0"] == "block0/BatchNorm_0" and simple["head"] is None
  resnet = pairs("resnet18")
  assert resnet["stem/conv"] == "stem/bn"
  assert resnet["block0/conv1"] == "block0/bn1" and resnet["block0/conv2"] == "block0/bn2"
  assert resnet["block2/shortcut_conv"] == "block2/shortcut_bn"
  assert all(bn is not None for path, bn in resnet.items() if path != "head")
  bottleneck = pairs("resnet50")
  assert bottleneck["block0/conv3"] == "block0/bn3"


# ------------------------------------------------------------------ flatness and Hessian


class Linear(nn.Module):
  """A linear softmax classifier: (N, 4) -> (N, 3)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return nn.Dense(3)(x)


def _linear_problem():
  model = Linear()
  x = jax.random.normal(jax.random.key(0), (12, 4))
  labels = jnp.arange(12) % 3
  variables = model.init(jax.random.key(1), x)
  # The second batch holds 4 real rows and 4 padding rows (mask 0) of junk that must not count.
  batches = [{"image": x[:8], "label": labels[:8], "mask": jnp.ones(8)},
             {"image": jnp.concatenate([x[8:], 9.0 * jnp.ones((4, 4))]),
              "label": jnp.concatenate([labels[8:], jnp.zeros(4, labels.dtype)]),
              "mask": jnp.ones(8).at[4:].set(0.0)}]
  return model, variables, batches, x, labels


def test_flatness_at_zero_noise_is_zero_and_grows_with_noise():
  model, variables, batches, _, _ = _linear_problem()
  batch_loss = analysis.classification_loss(model, variables)
  out = analysis.loss_increase(batch_loss, variables["params"], batches, key=jax.random.key(0),
                               noise_scales=(0.0, 1.0), draws=3)
  assert out["mean"][0] == 0.0 and out["std"][0] == 0.0
  assert out["mean"][1] > 0.0
  assert np.array(out["increase"]).shape == (2, 3)


def test_perturb_noise_is_relative_to_each_leaf():
  params = {"a": jnp.full((100, 100), 3.0), "b": jnp.zeros(7)}
  noisy = analysis.perturb(params, jax.random.key(0), 0.1)
  relative = jnp.linalg.norm(noisy["a"] - params["a"]) / jnp.linalg.norm(params["a"])
  assert abs(float(relative) - 0.1) < 0.005  # E||noise||^2 = sigma^2 ||p||^2
  np.testing.assert_array_equal(noisy["b"], params["b"])  # a zero leaf gets no noise


def test_mean_loss_drops_padding():
  model, variables, batches, x, labels = _linear_problem()
  batch_loss = analysis.classification_loss(model, variables)
  logits = model.apply(variables, x)
  expected = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(12), labels])
  np.testing.assert_allclose(analysis.mean_loss(batch_loss, variables["params"], batches),
                             expected, rtol=1e-5)


def test_hessian_top_eigenvalue_matches_jax_hessian():
  model, variables, batches, x, labels = _linear_problem()
  batch_loss = analysis.classification_loss(model, variables)
  flat, unravel = ravel_pytree(variables["params"])

  def loss(theta):
    logits = model.apply({"params": unravel(theta)}, x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(12), labels])

  hessian = jax.hessian(loss)(flat)
  vector = jax.random.normal(jax.random.key(4), flat.shape)
  hv = analysis.hessian_vector_product(batch_loss, variables["params"], batches, unravel(vector))
  np.testing.assert_allclose(ravel_pytree(hv)[0], hessian @ vector, rtol=1e-4, atol=1e-6)
  # Batches of different sizes (no padding): the same product.
  ragged = [{"image": x[:5], "label": labels[:5]}, {"image": x[5:], "label": labels[5:]}]
  hv = analysis.hessian_vector_product(batch_loss, variables["params"], ragged, unravel(vector))
  np.testing.assert_allclose(ravel_pytree(hv)[0], hessian @ vector, rtol=1e-4, atol=1e-6)
  exact = np.linalg.eigvalsh(np.asarray(hessian, np.float64))[-1]
  out = analysis.hessian_top_eigenvalue(batch_loss, variables["params"], batches,
                                        key=jax.random.key(0), iterations=200)
  np.testing.assert_allclose(out["eigenvalue"], exact, rtol=1e-3)
  assert out["iterations"] == 200
  # With a tolerance it stops once the estimate settles: fewer products, the same eigenvalue.
  early = analysis.hessian_top_eigenvalue(batch_loss, variables["params"], batches,
                                          key=jax.random.key(0), iterations=200, tolerance=1e-5)
  assert early["iterations"] < 200 and early["relative_change"] < 1e-5
  np.testing.assert_allclose(early["eigenvalue"], exact, rtol=1e-3)


# ------------------------------------------------------------------ the BN-folded parametrization


class TwoConvBN(nn.Module):
  """conv3x3 (2 -> 4) - BN - ReLU - conv3x3 (4 -> 3) - BN - spatial mean [- Dense(3)].
  (N, 4, 4, 2) -> (N, 3). Convs without bias; with `affine=False` the BatchNorms have no scale
  or offset and there is no head, so the two kernels are the only params."""
  affine: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    def bn():
      return nn.BatchNorm(use_running_average=not train, epsilon=1e-3, use_scale=self.affine,
                          use_bias=self.affine)
    x = nn.relu(bn()(nn.Conv(4, (3, 3), padding="SAME", use_bias=False)(x)))
    x = jnp.mean(bn()(nn.Conv(3, (3, 3), padding="SAME", use_bias=False)(x)), axis=(1, 2))
    return nn.Dense(3)(x) if self.affine else x


def _two_conv_problem(affine):
  model = TwoConvBN(affine=affine)
  x = jax.random.normal(jax.random.key(0), (16, 4, 4, 2))
  labels = jnp.arange(16) % 3
  variables = unfreeze(model.init(jax.random.key(1), x))
  variables["params"] = _random_like(variables["params"], jax.random.key(2), -1.0, 1.0)
  variables["batch_stats"] = _random_like(variables["batch_stats"], jax.random.key(3))
  batches = [{"image": x[:8], "label": labels[:8], "mask": jnp.ones(8)},
             {"image": x[8:], "label": labels[8:], "mask": jnp.ones(8)}]
  return model, variables, batches, x, labels


def _rescaled(variables, conv, bn, c, epsilon=1e-3):
  """The same eval-mode network with `conv`'s kernel times c (a scalar or per output channel):
  BN eval is (z - mean) / sqrt(var + eps), so mean -> c mean and var + eps -> c^2 (var + eps)."""
  out = jax.tree.map(lambda a: a, variables)
  c = jnp.asarray(c, jnp.float32)
  out["params"][conv]["kernel"] = variables["params"][conv]["kernel"] * c
  stats = variables["batch_stats"][bn]
  out["batch_stats"][bn] = {"mean": stats["mean"] * c,
                            "var": c ** 2 * (stats["var"] + epsilon) - epsilon}
  return out


def test_folded_parameters_by_hand_and_unfold_gives_the_same_network():
  model, variables, _, x, _ = _two_conv_problem(affine=True)
  layers = analysis.find_linear_layers(model, variables, x[:1])
  theta = analysis.folded_parameters(layers, variables)
  for conv, bn in (("Conv_0", "BatchNorm_0"), ("Conv_1", "BatchNorm_1")):
    gamma, beta = variables["params"][bn]["scale"], variables["params"][bn]["bias"]
    stats = variables["batch_stats"][bn]
    s = gamma / np.sqrt(stats["var"] + 1e-3)
    np.testing.assert_allclose(theta["layers"][conv]["kernel"],
                               variables["params"][conv]["kernel"] * s, rtol=1e-6)
    np.testing.assert_allclose(theta["layers"][conv]["bias"], beta - s * stats["mean"],
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(theta["layers"]["Dense_0"]["bias"],
                                variables["params"]["Dense_0"]["bias"])
  assert theta["other"] == {}  # every param is a layer's or a folded BatchNorm's
  unfolded = analysis.unfold_parameters(layers, variables, theta)
  np.testing.assert_allclose(model.apply(unfolded, x), model.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(unfolded["params"]["BatchNorm_0"]["scale"], np.ones(4))


def test_unfolded_simple_cnn_is_the_same_network():
  model = get_model("simple_cnn", num_classes=10, width=0.25)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  variables = unfreeze(model.init(jax.random.key(1), x))
  variables["params"] = _random_like(variables["params"], jax.random.key(2), -1.0, 1.0)
  variables["batch_stats"] = _random_like(variables["batch_stats"], jax.random.key(3))
  variables["norm"]["block2"]["Standardize_0"]["active"] = jnp.ones(())
  layers = analysis.find_linear_layers(model, variables, x[:1], train=False)
  unfolded = analysis.unfold_parameters(layers, variables,
                                        analysis.folded_parameters(layers, variables))
  expected = model.apply(variables, x, train=False)  # logits of order 1e3: float32 rounding
  np.testing.assert_allclose(model.apply(unfolded, x, train=False), expected, rtol=1e-4,
                             atol=1e-5 * float(jnp.max(jnp.abs(expected))))


def test_folded_hessian_matches_jax_hessian_of_the_folded_network_by_hand():
  model, variables, batches, x, labels = _two_conv_problem(affine=False)
  layers = analysis.find_linear_layers(model, variables, x[:1])
  # The folded network written out: conv(W * s) + b' with s = 1 / sqrt(var + eps),
  # b' = -s mean; ReLU; again; spatial mean. Its parameters (W1', b1', W2', b2') by hand.
  folded = []
  for conv, bn in (("Conv_0", "BatchNorm_0"), ("Conv_1", "BatchNorm_1")):
    stats = variables["batch_stats"][bn]
    s = 1.0 / np.sqrt(np.asarray(stats["var"], np.float64) + 1e-3)
    folded += [np.asarray(variables["params"][conv]["kernel"]) * s, -s * stats["mean"]]
  flat, unravel = ravel_pytree([jnp.asarray(a, jnp.float32) for a in folded])

  def conv(z, kernel):
    return jax.lax.conv_general_dilated(z, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def loss(theta):
    w1, b1, w2, b2 = unravel(theta)
    logits = jnp.mean(conv(jax.nn.relu(conv(x, w1) + b1), w2) + b2, axis=(1, 2))
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), labels])

  eigenvalues = np.linalg.eigvalsh(np.asarray(jax.hessian(loss)(flat), np.float64))
  exact = eigenvalues[np.argmax(np.abs(eigenvalues))]  # power iteration: largest magnitude
  batch_loss, theta = analysis.folded_classification_loss(model, variables, layers)
  np.testing.assert_allclose(analysis.mean_loss(batch_loss, theta, batches), loss(flat),
                             rtol=1e-5)
  out = analysis.hessian_top_eigenvalue(batch_loss, theta, batches, key=jax.random.key(0),
                                        iterations=300)
  np.testing.assert_allclose(out["eigenvalue"], exact, rtol=1e-3)


def _sharpness(model, variables, batches, x):
  """(raw top Hessian eigenvalue, BN-folded one, loss increases under relative noise)."""
  key = jax.random.key(5)
  raw = analysis.hessian_top_eigenvalue(analysis.classification_loss(model, variables),
                                        variables["params"], batches, key=key, iterations=30)
  layers = analysis.find_linear_layers(model, variables, x[:1])
  batch_loss, theta = analysis.folded_classification_loss(model, variables, layers)
  folded = analysis.hessian_top_eigenvalue(batch_loss, theta, batches, key=key, iterations=30)
  noise = analysis.loss_increase(analysis.classification_loss(model, variables),
                                 variables["params"], batches, key=key,
                                 noise_scales=(0.1, 0.3), draws=2)
  return raw["eigenvalue"], folded["eigenvalue"], np.array(noise["mean"])


def test_bn_rescaling_scales_the_raw_hessian_by_one_over_c_squared_not_the_folded_one():
  model, variables, batches, x, _ = _two_conv_problem(affine=False)
  c = 3.0
  rescaled = _rescaled(_rescaled(variables, "Conv_0", "BatchNorm_0", c),
                       "Conv_1", "BatchNorm_1", c)
  np.testing.assert_allclose(model.apply(rescaled, x), model.apply(variables, x),
                             rtol=1e-4, atol=1e-5)  # the same function
  raw, folded, noise = _sharpness(model, variables, batches, x)
  raw_c, folded_c, noise_c = _sharpness(model, rescaled, batches, x)
  # The kernels are the only params and L_c(V) = L(V / c): H_c = H / c^2.
  np.testing.assert_allclose(raw_c, raw / c ** 2, rtol=1e-3)
  np.testing.assert_allclose(folded_c, folded, rtol=1e-4)
  # Noise relative to each tensor's norm scales with the tensor: invariant to this rescaling.
  np.testing.assert_allclose(noise_c, noise, rtol=1e-3)
  # The raw weight norm moves with c, the BN-folded norms do not.
  layers = analysis.find_linear_layers(model, variables, x[:1])
  norms = analysis.norm_summary(analysis.layer_norms(layers, variables))
  norms_c = analysis.norm_summary(analysis.layer_norms(layers, rescaled))
  np.testing.assert_allclose(norms_c["sum_frobenius"], c * norms["sum_frobenius"], rtol=1e-5)
  np.testing.assert_allclose(norms_c["sum_frobenius_folded"], norms["sum_frobenius_folded"],
                             rtol=1e-5)
  np.testing.assert_allclose(norms_c["log10_product_spectral"], norms["log10_product_spectral"],
                             atol=1e-5)


def test_per_channel_bn_rescaling_leaves_the_folded_hessian_unchanged():
  model, variables, batches, x, _ = _two_conv_problem(affine=True)
  c = jnp.array([0.2, 1.0, 3.0, 10.0])  # one factor per output channel of Conv_0
  rescaled = _rescaled(variables, "Conv_0", "BatchNorm_0", c)
  np.testing.assert_allclose(model.apply(rescaled, x), model.apply(variables, x),
                             rtol=1e-4, atol=1e-5)
  raw, folded, noise = _sharpness(model, variables, batches, x)
  raw_c, folded_c, noise_c = _sharpness(model, rescaled, batches, x)
  np.testing.assert_allclose(folded_c, folded, rtol=1e-4)
  assert abs(raw_c / raw - 1.0) > 0.1
  # Per-tensor relative noise is not invariant to a per-channel rescaling.
  assert np.max(np.abs(noise_c / noise - 1.0)) > 0.1


# ------------------------------------------------------------------ robustness, memorization


class TwoUnits(nn.Module):
  """Units `body` (Dense-BN-Standardize) and `head` (Dense). (N, 4) -> (N, 3)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Body(name="body")(x, train)
    return nn.Dense(3, name="head")(x)


class Body(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x)))
    return Standardize()(x)


def test_resetting_a_unit_restores_the_init_accuracy():
  model = TwoUnits()
  x = jax.random.normal(jax.random.key(0), (64, 4))
  labels = jnp.argmax(x[:, :3], axis=-1)
  init = unfreeze(model.init(jax.random.key(1), x))
  other = unfreeze(model.init(jax.random.key(2), x))
  # "Trained": only the body moved (params and batch stats); its standardization is calibrated.
  final = jax.tree.map(lambda a: a, init)
  final["params"]["body"] = other["params"]["body"]
  final["batch_stats"]["body"] = jax.tree.map(lambda s: s + 0.5, init["batch_stats"]["body"])
  final["norm"]["body"]["Standardize_0"]["active"] = jnp.ones(())

  def accuracy(variables):
    return float(jnp.mean(jnp.argmax(model.apply(variables, x), -1) == labels))

  out = analysis.layer_robustness(accuracy, init, final, ["body", "head"])
  assert [u["unit"] for u in out["units"]] == ["body", "head"]
  reset = analysis.reset_unit(final, init, "body")
  for a, b in zip(jax.tree.leaves(reset["params"]), jax.tree.leaves(init["params"])):
    np.testing.assert_array_equal(a, b)
  assert float(reset["norm"]["body"]["Standardize_0"]["active"]) == 1.0  # left as trained
  reset["norm"] = init["norm"]
  assert out["units"][0]["accuracy"] == accuracy(reset)
  assert out["units"][0]["drop"] == pytest.approx(out["accuracy"] - accuracy(reset))
  assert out["units"][1]["drop"] == 0.0  # the head never moved
  assert out["init_accuracy"] == accuracy(init)


def test_resetting_a_unit_of_a_plain_network_gives_the_init_accuracy():
  model = TwoUnits()
  x = jax.random.normal(jax.random.key(0), (64, 4))
  labels = jnp.argmax(x[:, :3], axis=-1)
  init = model.init(jax.random.key(1), x)
  final = unfreeze(jax.tree.map(lambda a: a, init))
  final["params"]["head"] = model.init(jax.random.key(7), x)["params"]["head"]
  accuracy = lambda v: float(jnp.mean(jnp.argmax(model.apply(v, x), -1) == labels))
  out = analysis.layer_robustness(accuracy, init, final, ["body", "head"])
  assert out["units"][1]["accuracy"] == out["init_accuracy"]


def test_memorization_metrics_by_hand():
  true = np.array([0, 1, 2, 0, 1, 2])
  trained_on = np.array([1, 1, 0, 0, 1, 2])  # examples 0 and 2 corrupted
  corrupted = trained_on != true
  predictions = np.array([1, 1, 2, 0, 0, 2])  # 0: memorized, 2: true label, 4: clean miss
  m = analysis.memorization_metrics(predictions, trained_on, true, corrupted)
  assert m["corrupted_examples"] == 2 and m["clean_examples"] == 4
  assert m["memorized"] == 0.5 and m["corrupted_true_accuracy"] == 0.5
  assert m["clean_accuracy"] == 0.75 and m["train_accuracy"] == pytest.approx(4 / 6)
  masked = analysis.memorization_metrics(predictions, trained_on, true, corrupted,
                                         mask=np.array([1, 1, 0, 1, 1, 1]))
  assert masked["memorized"] == 1.0 and masked["corrupted_examples"] == 1
  none = analysis.memorization_metrics(predictions, true, true, np.zeros(6, bool))
  assert np.isnan(none["memorized"])


# ---------------------------------------------------------- launch.analysis_run and launch.analyze


class _FakeDataset:
  """The slice of the tf.data API that launch.analyze uses, over padded numpy batches with a
  mask (no TensorFlow import: it would cost this test seconds)."""

  def __init__(self, images, labels, batch_size, **extra):
    n = len(labels)
    pad = -n % batch_size
    fields = {"image": images, "label": labels, **extra, "mask": np.ones(n, np.float32)}
    fields = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
              for k, v in fields.items()}
    self._batches = [{k: v[i:i + batch_size] for k, v in fields.items()}
                     for i in range(0, n + pad, batch_size)]

  def as_numpy_iterator(self):
    return iter(self._batches)

  def take(self, count):
    out = _FakeDataset.__new__(_FakeDataset)
    out._batches = self._batches[:count]  # pylint: disable=protected-access
    return out


def test_loss_batches_are_the_real_examples_and_give_the_padded_batches_hessian():
  """The analyses' loss batches (`_first_batches`) drop padding rows, keep every real example
  in order, and skip a batch of padding only; the Hessian-vector product over them (a stacked
  batch and a shorter tail) equals the one over the padded batches."""
  from launch import analysis_run as analyze_lib
  model, variables, padded, x, labels = _linear_problem()
  dataset = _FakeDataset(np.asarray(x), np.asarray(labels), 5)  # 5, 5, 2 real + 3 padding
  dataset._batches.append({k: np.zeros_like(v) for k, v in dataset._batches[-1].items()})
  batches = analyze_lib._first_batches(dataset, 4)
  assert [len(b["label"]) for b in batches] == [5, 5, 2]
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), x)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels)
  batch_loss = analysis.classification_loss(model, variables)
  vector = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape),
                        variables["params"])
  np.testing.assert_allclose(
      ravel_pytree(analysis.hessian_vector_product(batch_loss, variables["params"], batches,
                                                   vector))[0],
      ravel_pytree(analysis.hessian_vector_product(batch_loss, variables["params"], padded,
                                                   vector))[0], rtol=1e-5, atol=1e-7)


def test_analyze_end_to_end_with_label_noise():
  from configs import digits as digits_config
  from launch import analysis_run as analyze_lib
  from reinit import train
  import reinit

  config = digits_config.get_config()
  config.width = 0.125
  config.label_noise = 0.25
  model = train.create_model(config, 10)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
  true = rng.integers(0, 10, 40).astype(np.int32)
  corrupted = np.arange(40) % 4 == 0
  trained_on = np.where(corrupted, (true + 1) % 10, true).astype(np.int32)
  init = unfreeze(model.init(jax.random.key(0), jnp.asarray(images[:1])))
  final = jax.tree.map(lambda a: a, init)
  final["params"]["head"] = model.init(jax.random.key(1), images[:1])["params"]["head"]
  units = reinit.layer_order(model, jax.random.key(0), images[:1])
  run = workdir_lib.FinishedRun(config, {"dataset": "digits", "model": "simple_cnn", "method": "lw",
                                   "seed": 0, "train_examples": 40, "num_classes": 10,
                                   "units": units}, model, init, final)
  train_ds = _FakeDataset(images, trained_on, 16, true_label=true, corrupted=corrupted)
  test_ds = _FakeDataset(images[:24], true[:24], 16)
  out = analyze_lib.analyze(run, model, train_ds, test_ds, noise_scales=[0.0, 0.05], draws=2,
                            batches=2, power_iterations=5, hessian_iterations=3,
                            analyses=list(analyze_lib.ANALYSES), seed=0)
  json.dumps(out, allow_nan=False)  # standard JSON: no NaN or Infinity
  assert out["margins"]["train"]["examples"] == 40 and out["margins"]["test"]["examples"] == 24
  assert out["flatness"]["mean"][0] == 0.0 and out["flatness"]["examples"] == 32
  assert [u["unit"] for u in out["robustness"]["units"]] == units
  assert out["robustness"]["units"][-1]["accuracy"] == out["robustness"]["init_accuracy"]
  assert [u["drop"] for u in out["robustness"]["units"][:-1]] == [0.0] * (len(units) - 1)
  memo = out["memorization"]
  assert memo["corrupted_examples"] == 10 and memo["clean_examples"] == 30
  assert np.isfinite(out["hessian"]["eigenvalue"])
  assert np.isfinite(out["hessian_folded"]["eigenvalue"]) and out["hessian_folded"]["examples"] == 32
  assert "top Hessian eigenvalue (BN-folded)" in analyze_lib.summary(out)
  assert len(out["norms"]["layers"]) == 13  # 6 convs + 6 standardizations + head


@pytest.mark.parametrize("flag, named", [("--draws=0", "--draws=0"),
                                         ("--noise_scales=0.1,x", "--noise_scales=0.1,x"),
                                         ("--analyses=margins,foo", "--analyses=margins,foo")])
def test_analyze_cli_bad_flags_exit_2_with_one_line(tmp_path, flag, named):
  proc = subprocess.run([sys.executable, "-m", "launch.analyze", f"--workdir={tmp_path}", flag],
                        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and named in lines[0] and "accepted" in lines[0], proc.stderr
