"""Training margins and the norms of a network's linear operators.

The paper (abstract, §4.1) says LW raises the margin on training examples without raising the
weight norm. The margin definition and the bound it used are not known, so this module gives the
raw margin and the spectrally normalized one of the margin-bound literature (Bartlett, Foster &
Telgarsky 2017; Neyshabur et al. 2017), and both weight-norm measures:

  margin(x, y)       f_y(x) - max_{j != y} f_j(x), eval-mode logits (BatchNorm on running stats)
  normalized margin  margin / prod_l ||A_l||_2, the product over the network's linear operators
  sum of Frobenius   sum_l ||W_l||_F over the raw conv/dense kernels (the "weight norm")

The linear operators A_l (found by tracing one forward pass, in call order):

  conv   a `nn.Conv` with its BatchNorm folded in. Its spectral norm is that of the convolution
         *operator* at the input spatial size, stride and padding the layer sees in the forward
         pass, by power iteration on A^T A (A^T from `jax.linear_transpose`).
  dense  a `nn.Dense` (BatchNorm folded in likewise, if one follows). Spectral norm by SVD.
  standardize  an active `Standardize` (LW's frozen standardization), the diagonal map
         x -> (x - m) / sqrt(v + eps): spectral norm max_c 1 / sqrt(v_c + eps). It rescales
         activations just as a kernel would, so leaving it out would flatter LW. An inactive one
         is the identity and is skipped.

BatchNorm folding rule: a `nn.BatchNorm` whose input is the very array a `nn.Conv` or `nn.Dense`
returned (same traced value, so nothing sits between them) is folded into that layer. In eval
mode BN is y = gamma (z - mu) / sqrt(nu + eps) + beta, so with s = gamma / sqrt(nu + eps) per
output channel the folded layer is W' = W * s (last axis), b' = s (b - mu) + beta. In our models
this pairs `Conv_0`<->`BatchNorm_0` (SimpleCNN and VGG blocks), `conv1`<->`bn1`, `conv2`<->`bn2`,
`conv3`<->`bn3`, `shortcut_conv`<->`shortcut_bn` and `stem/conv`<->`stem/bn` (ResNets). The rule
follows data flow, not names, so it works for any linen model.

The BN-folded parameters (`folded_parameters`: every layer's W' and b', plus the params that
belong to no layer) describe the eval-mode network without saying how each layer's scale is
split between its kernel and its BatchNorm, so the folded norms, and sharpness measured in them
(`flatness.folded_classification_loss`), are invariant to rescaling a kernel followed by
BatchNorm; the raw sum of Frobenius norms is not (it moves with the kernel's scale).

Left out of the product: ReLU and non-overlapping max-pooling (1-Lipschitz) and global average
pooling (a constant 1/sqrt(HW) per architecture and input size). For plain CNNs the product is
then an upper bound on the network's Lipschitz constant up to that constant; for ResNets it is
the usual complexity proxy, not a bound (residual sums are not products). Either way it compares
methods on one architecture and input size, which is what the analyses do.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from reinit.models.standardize import NORM_COLLECTION, Standardize

PyTree = Any

_PERCENTILES = (10, 25, 50, 75, 90)


# ---------------------------------------------------------------- margins


def logit_margins(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """f_y(x) - max_{j != y} f_j(x). logits (N, C) float, labels (N,) int -> (N,) float32.

  Positive when the example is classified correctly, negative when not, 0 on a tie.
  """
  logits = jnp.asarray(logits, jnp.float32)
  num_classes = logits.shape[-1]
  is_label = jax.nn.one_hot(labels, num_classes, dtype=bool)
  correct = jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)
  best_other = jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)
  return correct - best_other


def margin_statistics(margins) -> dict[str, float]:
  """Summary of per-example margins (N,): count, mean, percentiles p10..p90 (p50 = median), and
  the fraction of examples with margin <= 0 (misclassified or tied)."""
  margins = np.asarray(margins, np.float64)
  stats = {"examples": int(margins.size), "mean": float(np.mean(margins))}
  for q, value in zip(_PERCENTILES, np.percentile(margins, _PERCENTILES)):
    stats[f"p{q}"] = float(value)
  stats["median"] = stats["p50"]
  stats["fraction_nonpositive"] = float(np.mean(margins <= 0))
  return stats


def normalize_margins(margins, spectral_norms) -> np.ndarray:
  """margins (N,) / prod(spectral_norms) (L,), via the sum of logs (the product of many layers'
  norms can overflow float32). Returns float64 (N,)."""
  log_product = float(np.sum(np.log(np.asarray(spectral_norms, np.float64))))
  return np.asarray(margins, np.float64) * np.exp(-log_product)


# ---------------------------------------------------------------- finding the linear layers


@dataclasses.dataclass(frozen=True)
class LinearLayer:
  """A linear operator of the forward pass, as the norms need it.

  Attributes:
    path: `/`-joined module path, e.g. 'block0/Conv_0' (no collection name).
    kind: 'conv', 'dense' or 'standardize'.
    input_shape: shape of one example's input to the layer, (H, W, C_in) or (C_in,).
    batchnorm: module path of the BatchNorm folded into it, or None.
    bn_epsilon: that BatchNorm's epsilon.
    conv: the conv's `strides`, `padding`, `input_dilation`, `kernel_dilation` and
      `feature_group_count` as the module holds them; empty for other kinds.
    epsilon: a `Standardize`'s epsilon (0 for other kinds).
  """
  path: str
  kind: str
  input_shape: tuple[int, ...]
  batchnorm: str | None = None
  bn_epsilon: float = 0.0
  conv: dict = dataclasses.field(default_factory=dict)
  epsilon: float = 0.0


_CONV_FIELDS = ("strides", "padding", "input_dilation", "kernel_dilation", "feature_group_count")


def find_linear_layers(model: nn.Module, variables: PyTree, x: jax.Array,
                       **apply_kwargs) -> list[LinearLayer]:
  """The convs, denses and Standardizes of one forward pass, in call order, with BN pairs.

  Traces `model.apply(variables, x, **apply_kwargs)` abstractly (`jax.eval_shape`, nothing is
  computed) while intercepting module calls: the input shapes are those the layers really see,
  and a BatchNorm is paired with a conv/dense when its input is that layer's output (see the
  module docstring). A module called more than once (shared weights) is listed at its first call.

  Args:
    model: a linen module.
    variables: its variables (only shapes matter).
    x: an input batch, e.g. one example (1, H, W, C).
    **apply_kwargs: e.g. `train=False`.
  """
  records: list[dict] = []
  outputs: list[tuple[Any, int]] = []  # (traced output, index in records) of convs and denses
  seen: set[str] = set()

  def intercept(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not args:
      return out
    path = "/".join(module.path)
    if isinstance(module, nn.BatchNorm):
      source = next((i for o, i in outputs if o is args[0]), None)
      if source is not None and records[source]["batchnorm"] is None:
        if module.axis not in (-1, args[0].ndim - 1):
          raise ValueError(f"find_linear_layers: BatchNorm {path} normalizes axis "
                           f"{module.axis}; only the channel (last) axis can be folded")
        records[source].update(batchnorm=path, bn_epsilon=float(module.epsilon))
      return out
    if path in seen:
      return out
    if isinstance(module, (nn.Conv, nn.Dense)):
      seen.add(path)
      conv = ({f: getattr(module, f) for f in _CONV_FIELDS} if isinstance(module, nn.Conv)
              else {})
      records.append(dict(path=path, kind="conv" if conv else "dense",
                          input_shape=tuple(args[0].shape[1:]), batchnorm=None,
                          bn_epsilon=0.0, conv=conv))
      outputs.append((out, len(records) - 1))
    elif isinstance(module, Standardize):
      seen.add(path)
      records.append(dict(path=path, kind="standardize", input_shape=tuple(args[0].shape[1:]),
                          epsilon=float(module.epsilon)))
    return out

  with nn.intercept_methods(intercept):
    jax.eval_shape(lambda v, inputs: model.apply(v, inputs, **apply_kwargs), variables, x)
  return [LinearLayer(**r) for r in records]


# ---------------------------------------------------------------- folding and spectral norms


def _get(tree: PyTree, path: str, default=None) -> PyTree:
  """The subtree at `path`; `default` (when given) if it is missing, e.g. the params of a
  BatchNorm without scale and offset."""
  for part in path.split("/"):
    if default is not None and part not in tree:
      return default
    tree = tree[part]
  return tree


def fold_batchnorm(kernel: jax.Array, bias: jax.Array | None, *, scale: jax.Array | None,
                   offset: jax.Array | None, mean: jax.Array, var: jax.Array,
                   epsilon: float) -> tuple[jax.Array, jax.Array]:
  """Folds an eval-mode BatchNorm into the layer before it.

  kernel (..., C_out) (conv (kh, kw, C_in, C_out) or dense (C_in, C_out)); bias, scale, offset,
  mean, var (C_out,); None for a missing bias (0), scale (1) or offset (0).
  Returns (kernel * s, s * (bias - mean) + offset) with s = scale / sqrt(var + epsilon).
  """
  s = jnp.reciprocal(jnp.sqrt(var + epsilon))
  if scale is not None:
    s = s * scale
  bias = jnp.zeros_like(mean) if bias is None else bias
  offset = jnp.zeros_like(mean) if offset is None else offset
  return kernel * s, s * (bias - mean) + offset


def folded_kernel(layer: LinearLayer, variables: PyTree) -> tuple[jax.Array, jax.Array]:
  """(kernel, folded kernel) of a conv/dense layer of `variables` ({'params', 'batch_stats'})."""
  params = _get(variables["params"], layer.path)
  kernel = jnp.asarray(params["kernel"], jnp.float32)
  if layer.batchnorm is None:
    return kernel, kernel
  bn_params = _get(variables["params"], layer.batchnorm, {})
  bn_stats = _get(variables["batch_stats"], layer.batchnorm)
  folded, _ = fold_batchnorm(kernel, params.get("bias"), scale=bn_params.get("scale"),
                             offset=bn_params.get("bias"), mean=bn_stats["mean"],
                             var=bn_stats["var"], epsilon=layer.bn_epsilon)
  return kernel, folded


# ---------------------------------------------------------------- the BN-folded parametrization


def folded_parameters(layers: list[LinearLayer], variables: PyTree) -> dict:
  """The eval-mode network's parameters with every BatchNorm folded into its conv/dense.

  theta = {'layers': {path: {'kernel': W', 'bias': b'}}, 'other': {leaf path: value}}:
  for each conv/dense of `layers` (`find_linear_layers`), W' = W * s and b' = s (b - mu) + beta
  (`fold_batchnorm`) when a BatchNorm is folded into it, else its own kernel (and bias, when it
  has one); 'other' holds every params leaf that is neither a layer's kernel/bias nor a folded
  BatchNorm's scale/offset, keyed by its `/`-joined path. Float32 leaves.

  theta is a function of the eval-mode network alone, not of how its scale is split between a
  kernel and the BatchNorm after it: W -> c W (c a scalar or per output channel) with running
  mean -> c mean and var + eps -> c^2 (var + eps) gives the same theta. `unfold_parameters` maps
  theta back to variables.
  """
  params = variables["params"]
  used, folded = set(), {}
  for layer in layers:
    if layer.kind == "standardize":
      continue
    layer_params = _get(params, layer.path)
    used |= {f"{layer.path}/kernel", f"{layer.path}/bias"}
    kernel = jnp.asarray(layer_params["kernel"], jnp.float32)
    bias = layer_params.get("bias")
    if layer.batchnorm is None:
      folded[layer.path] = {"kernel": kernel}
      if bias is not None:
        folded[layer.path]["bias"] = jnp.asarray(bias, jnp.float32)
      continue
    bn_params = _get(params, layer.batchnorm, {})
    bn_stats = _get(variables["batch_stats"], layer.batchnorm)
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
    kernel, bias = fold_batchnorm(kernel, f32(bias), scale=f32(bn_params.get("scale")),
                                  offset=f32(bn_params.get("bias")),
                                  mean=f32(bn_stats["mean"]), var=f32(bn_stats["var"]),
                                  epsilon=layer.bn_epsilon)
    folded[layer.path] = {"kernel": kernel, "bias": bias}
    used |= {f"{layer.batchnorm}/scale", f"{layer.batchnorm}/bias"}
  flat = traverse_util.flatten_dict(params, sep="/")
  other = {k: jnp.asarray(v, jnp.float32) for k, v in flat.items() if k not in used}
  return {"layers": folded, "other": other}


def unfold_parameters(layers: list[LinearLayer], variables: PyTree, theta: dict) -> PyTree:
  """Variables whose eval-mode network is the folded network of theta (`folded_parameters`).

  Each conv/dense gets W' as its kernel; where a BatchNorm was folded in, the layer's own bias
  and the BatchNorm's offset are 0, its scale 1, its running var 1 - eps and its running mean
  -b', so that it adds b' and nothing else. Of `variables` only the params' shapes and dtypes,
  the batch statistics of BatchNorms not folded into a layer, and the other collections are
  used: every params leaf comes from theta or is one of those constants (a ValueError names
  any that would not), so `variables["params"]` may hold `jax.ShapeDtypeStruct`s.
  """
  shapes = traverse_util.flatten_dict(variables["params"], sep="/")
  stats = dict(traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/"))
  flat = {}

  def constant(key, value):
    if key in shapes:
      flat[key] = jnp.full(shapes[key].shape, value, shapes[key].dtype)

  for layer in layers:
    if layer.kind == "standardize":
      continue
    entry = theta["layers"][layer.path]
    flat[f"{layer.path}/kernel"] = entry["kernel"]
    if layer.batchnorm is None:
      if "bias" in entry:
        flat[f"{layer.path}/bias"] = entry["bias"]
      continue
    if not layer.bn_epsilon < 1.0:
      raise ValueError(f"unfold_parameters: BatchNorm {layer.batchnorm} has epsilon "
                       f"{layer.bn_epsilon}; folding needs epsilon < 1")
    constant(f"{layer.path}/bias", 0.0)
    constant(f"{layer.batchnorm}/scale", 1.0)
    constant(f"{layer.batchnorm}/bias", 0.0)
    stats[f"{layer.batchnorm}/mean"] = -entry["bias"]
    stats[f"{layer.batchnorm}/var"] = jnp.full_like(entry["bias"], 1.0 - layer.bn_epsilon)
  flat.update(theta["other"])
  missing = sorted(set(shapes) - set(flat))
  if missing:
    raise ValueError(f"unfold_parameters: params {missing} are not in theta")
  out = {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}
  if stats:
    out["batch_stats"] = traverse_util.unflatten_dict(stats, sep="/")
  return out


def standardize_scales(layer: LinearLayer, variables: PyTree) -> jax.Array:
  """Per-channel factor (C,) of a `Standardize`: 1/sqrt(var + eps) when active, 1 when not."""
  norm = _get(variables[NORM_COLLECTION], layer.path)
  active = jnp.asarray(norm["active"], jnp.float32)
  inverse_std = jnp.reciprocal(jnp.sqrt(jnp.asarray(norm["var"], jnp.float32) + layer.epsilon))
  return 1.0 + active * (inverse_std - 1.0)


def conv_operator(kernel: jax.Array, **conv_fields) -> Callable[[jax.Array], jax.Array]:
  """The linear map x (N, H, W, C_in) -> conv(x) of `kernel` (kh, kw, C_in/groups, C_out).

  `conv_fields` are `nn.Conv`'s strides, padding, input_dilation, kernel_dilation and
  feature_group_count; the map is `nn.Conv` itself (no bias), so padding means what it means
  in the model ('SAME', 'CIRCULAR', explicit pairs...).
  """
  conv = nn.Conv(kernel.shape[-1], kernel.shape[:-2], use_bias=False, dtype=kernel.dtype,
                 param_dtype=kernel.dtype, **conv_fields)
  return lambda x: conv.apply({"params": {"kernel": kernel}}, x)


def gaussian_start(shape, seed) -> np.ndarray:
  """A N(0, I) float32 start vector of `shape` from `np.random.default_rng(seed)` (numpy: no
  random program to compile per layer shape). `seed` is an int or a sequence of ints."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def operator_spectral_norm(apply: Callable[[jax.Array], jax.Array], start: jax.Array, *,
                           iterations: int = 100) -> jax.Array:
  """Largest singular value of the linear map `apply` (inputs shaped like `start`).

  Power iteration on A^T A from `start` (e.g. `gaussian_start`), A^T by `jax.linear_transpose`.
  It converges from below at rate (sigma_2 / sigma_1)^(2 * iterations); the result is ||A v||
  for the final unit vector v. Returns a float32 scalar (0 for the zero map).
  """
  start = jnp.asarray(start, jnp.float32)
  transpose = jax.linear_transpose(apply, start)

  def unit(v):
    return v / jnp.maximum(jnp.linalg.norm(v), 1e-30)

  def step(_, v):
    return unit(transpose(apply(v))[0])

  v = jax.lax.fori_loop(0, iterations, step, unit(start))
  return jnp.linalg.norm(apply(v))


def conv_spectral_norm(kernel: jax.Array, input_shape, *, seed=0, iterations: int = 100,
                       **conv_fields) -> jax.Array:
  """Spectral norm of the conv operator of `kernel` (kh, kw, C_in/groups, C_out) on one input of
  `input_shape` (H, W, C_in), by `operator_spectral_norm` from `gaussian_start(.., seed)`;
  `conv_fields` as in `conv_operator`. Float32 scalar."""
  start = gaussian_start((1, *input_shape), seed)
  return _jit_conv_norm(jnp.asarray(kernel, jnp.float32), start, iterations,
                        tuple(sorted(_hashable(conv_fields).items())))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _jit_conv_norm(kernel, start, iterations, conv_items):
  apply = conv_operator(kernel, **dict(conv_items))
  return operator_spectral_norm(apply, start, iterations=iterations)


def _hashable(fields: dict) -> dict:
  """Conv fields with lists turned into tuples, so they can be static jit arguments."""
  def freeze(value):
    if isinstance(value, (list, tuple)):
      return tuple(freeze(v) for v in value)
    return value
  return {k: freeze(v) for k, v in fields.items()}


def dense_spectral_norm(kernel: jax.Array) -> jax.Array:
  """Largest singular value of a dense kernel (C_in, C_out), exact (SVD). Float32 scalar."""
  return jnp.linalg.norm(jnp.asarray(kernel, jnp.float32), ord=2)


# Dense kernels with more entries get power iteration instead of a full SVD (VGG's 'fc' head).
_MAX_SVD_SIZE = 1 << 22


def layer_norms(layers: list[LinearLayer], variables: PyTree, *, seed: int = 0,
                iterations: int = 100) -> list[dict]:
  """Norms of each linear layer of `variables` (see `find_linear_layers`); layer i's power
  iteration starts from `gaussian_start(.., (seed, i))`.

  Returns one dict per layer: path, kind, batchnorm, input_shape, `frobenius` (raw kernel),
  `frobenius_folded` (BN folded in) (both None for a standardize, which holds no weights) and
  `spectral` (of the folded operator).
  """
  out = []
  for i, layer in enumerate(layers):
    if layer.kind == "standardize":
      # Not a weight: no Frobenius norm (None keeps the JSON standard, unlike NaN).
      frobenius = frobenius_folded = None
      spectral = float(jnp.max(jnp.abs(standardize_scales(layer, variables))))
    else:
      kernel, folded = folded_kernel(layer, variables)
      frobenius, frobenius_folded = float(jnp.linalg.norm(kernel)), float(jnp.linalg.norm(folded))
      if layer.kind == "conv":
        spectral = float(conv_spectral_norm(folded, layer.input_shape, seed=(seed, i),
                                            iterations=iterations, **layer.conv))
      elif folded.size <= _MAX_SVD_SIZE:
        spectral = float(dense_spectral_norm(folded))
      else:
        spectral = float(operator_spectral_norm(
            lambda x, k=folded: x @ k, gaussian_start((1, folded.shape[0]), (seed, i)),
            iterations=iterations))
    out.append(dict(path=layer.path, kind=layer.kind, batchnorm=layer.batchnorm,
                    input_shape=list(layer.input_shape), frobenius=frobenius,
                    frobenius_folded=frobenius_folded, spectral=spectral))
  return out


def norm_summary(norms: list[dict]) -> dict[str, float]:
  """Totals over `layer_norms(...)`: `sum_frobenius` (raw conv/dense kernels: the weight norm),
  `sum_frobenius_folded`, `log10_product_spectral` (all layers incl. active standardizations)
  and `product_spectral` (inf when it overflows float64)."""
  weights = [n for n in norms if n["kind"] != "standardize"]
  log10_product = float(np.sum(np.log10([n["spectral"] for n in norms])))
  return {
      "sum_frobenius": float(sum(n["frobenius"] for n in weights)),
      "sum_frobenius_folded": float(sum(n["frobenius_folded"] for n in weights)),
      "log10_product_spectral": log10_product,
      "product_spectral": float(10.0 ** log10_product) if log10_product < 300 else None,
      "num_layers": len(norms),
  }
