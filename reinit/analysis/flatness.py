"""Flatness of the training loss around the final weights: noise robustness and Hessian.

The paper (§4.2) compares "the impact on the training loss when the model parameters are
perturbed by some standard Gaussian noise" and finds a smaller increase for LW at every noise
amount. Its noise scaling is not known; here it is relative to each tensor's own norm, so that
the perturbation means the same for a kernel of norm 30 and a BN scale of norm 3:

  p -> p + sigma * ||p||_F * eps / sqrt(p.size),   eps ~ N(0, I) of p's shape,

for every params leaf p (batch statistics and LW's standardization are left alone). The noise
then has E||noise||^2 = sigma^2 ||p||^2: sigma is the relative size of the perturbation. The
loss is the eval-mode cross-entropy (BatchNorm on running statistics) averaged over a fixed set
of training batches; each draw d uses the same eps for every sigma (common random numbers), so
the curve over sigma is smooth.

Sharpness is also measured by the top eigenvalue of the Hessian of that loss with respect to the
params, by power iteration on Hessian-vector products (`jax.jvp` of `jax.grad`), accumulated
batch by batch so memory is that of one batch.

The raw Hessian is not a property of the function alone: a kernel followed by BatchNorm can be
multiplied by c (its BatchNorm's running mean by c, var + eps by c^2) without changing the
eval-mode network, and that block of the Hessian then scales by 1/c^2 (LW rescales the kept
kernels to their initial norms). `folded_classification_loss` gives the same loss as a function
of the BN-folded parameters (`margins.folded_parameters`), in which that rescaling, per tensor
or per output channel, is no change at all; its top Hessian eigenvalue is the invariant
sharpness. The relative noise above is invariant to a whole tensor's scale (the noise scales
with it) but not to a per-channel one.

Losses are given as `batch_loss(params, batch) -> (sum of per-example losses, example count)`
so that padded batches (a `mask`) average correctly; `classification_loss` builds one for a
linen classifier.
"""

import functools
from typing import Any, Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from reinit.analysis import margins

PyTree = Any
BatchLoss = Callable[[PyTree, dict], tuple[jax.Array, jax.Array]]


def classification_loss(model: nn.Module, variables: PyTree) -> BatchLoss:
  """`(params, batch) -> (sum of cross-entropies, count)` of `model` in eval mode.

  batch: image (B, H, W, C), label (B,) int, optional mask (B,) (1 real, 0 padding). The other
  collections of `variables` (batch_stats, norm) are held fixed; the result is jitted.
  """
  rest = {k: v for k, v in variables.items() if k != "params"}

  @jax.jit
  def batch_loss(params, batch):
    logits = model.apply({**rest, "params": params}, batch["image"], train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                             batch["label"])
    mask = batch.get("mask", jnp.ones_like(losses))
    return jnp.sum(losses * mask), jnp.sum(mask)
  return batch_loss


def folded_classification_loss(model: nn.Module, variables: PyTree,
                               layers: Sequence[margins.LinearLayer]) -> tuple[BatchLoss, dict]:
  """(batch_loss, theta): `classification_loss` as a function of the BN-folded parameters.

  theta = `margins.folded_parameters(layers, variables)`, `layers` from `find_linear_layers`;
  `batch_loss(theta, batch)` runs `model` in eval mode on `margins.unfold_parameters(theta)`,
  so at theta it is the loss of `variables`. Only the params' shapes, the batch statistics of
  BatchNorms not folded into a layer and the other collections are held (no copy of the
  weights: they would be constants of every compiled Hessian-vector product); jitted.
  """
  layers = list(layers)
  theta = margins.folded_parameters(layers, variables)
  skeleton = {**variables, "params": jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)), variables["params"])}

  @jax.jit
  def batch_loss(theta, batch):
    unfolded = margins.unfold_parameters(layers, skeleton, theta)
    logits = model.apply(unfolded, batch["image"], train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                             batch["label"])
    mask = batch.get("mask", jnp.ones_like(losses))
    return jnp.sum(losses * mask), jnp.sum(mask)
  return batch_loss, theta


def mean_loss(batch_loss: BatchLoss, params: PyTree, batches: Sequence[dict]) -> float:
  """Mean per-example loss over all real examples of `batches`."""
  total, count = 0.0, 0.0
  for batch in batches:
    s, c = batch_loss(params, batch)
    total, count = total + float(s), count + float(c)
  return total / count


def _gaussian_like(tree: PyTree, key: jax.Array) -> PyTree:
  """N(0, I) float32 leaves shaped like `tree`'s: one draw of `key` over all leaves
  concatenated in `jax.tree.leaves` order, cut back into leaves (one random call compiles much
  faster than one per leaf).

  Not `optax.tree_utils.tree_random_like`: that splits `key` once per leaf and draws in each
  leaf's dtype, so its noise differs from these draws and every recorded flatness and Hessian
  number would change.
  """
  leaves, treedef = jax.tree.flatten(tree)
  sizes = [int(np.size(p)) for p in leaves]
  eps = jax.random.normal(key, (sum(sizes),), jnp.float32)
  offsets = np.cumsum([0] + sizes)
  return jax.tree.unflatten(treedef, [eps[a:b].reshape(jnp.shape(p)) for p, a, b
                                      in zip(leaves, offsets[:-1], offsets[1:])])


@jax.jit
def perturb(params: PyTree, key: jax.Array, sigma: float) -> PyTree:
  """Each leaf p -> p + sigma * ||p||_F * eps / sqrt(p.size), eps ~ N(0, I) (`_gaussian_like`
  of `key`). sigma = 0 returns the values unchanged; so does a zero leaf."""
  def add_noise(p, eps):
    p32 = jnp.asarray(p, jnp.float32)
    scale = sigma * jnp.linalg.norm(p32) / np.sqrt(max(p32.size, 1))
    return (p32 + scale * eps).astype(jnp.asarray(p).dtype)
  return jax.tree.map(add_noise, params, _gaussian_like(params, key))


def loss_increase(batch_loss: BatchLoss, params: PyTree, batches: Sequence[dict], *,
                  key: jax.Array, noise_scales: Iterable[float] = (0.001, 0.003, 0.01, 0.03, 0.1),
                  draws: int = 5) -> dict:
  """Training-loss increase under relative Gaussian weight noise (see the module docstring).

  Returns a dict: `base_loss` (float), `noise_scales` (S,), `increase` (S, draws) loss minus
  base loss per draw, `mean` (S,) and `std` (S,) over draws (sample std, ddof=1; 0 for one draw).
  """
  noise_scales = [float(s) for s in noise_scales]
  base = mean_loss(batch_loss, params, batches)
  increase = np.zeros((len(noise_scales), draws))
  for d in range(draws):
    draw_key = jax.random.fold_in(key, d)  # the same eps for every sigma
    for i, sigma in enumerate(noise_scales):
      increase[i, d] = mean_loss(batch_loss, perturb(params, draw_key, sigma), batches) - base
  std = increase.std(axis=1, ddof=1) if draws > 1 else np.zeros(len(noise_scales))
  return {"base_loss": base, "noise_scales": noise_scales, "increase": increase.tolist(),
          "mean": increase.mean(axis=1).tolist(), "std": std.tolist()}


def _tree_norm(tree: PyTree) -> jax.Array:
  """sqrt(<tree, tree>). Not `optax.tree_utils.tree_norm`: it sums squares leaf by leaf, which
  rounds differently from a dot product and would change the recorded Hessian eigenvalues."""
  return jnp.sqrt(otu.tree_vdot(tree, tree))


def hessian_vector_product(batch_loss: BatchLoss, params: PyTree, batches: Sequence[dict],
                           vector: PyTree) -> PyTree:
  """H v for the mean loss over `batches`, H its Hessian w.r.t. `params` (forward-over-reverse:
  `jax.jvp` of `jax.grad`), summed batch by batch in one program. `vector` has the structure
  of `params`."""
  stacked, tail, count = _stacked(batches, batch_loss, params)
  return _summed_hvp(batch_loss, params, stacked, tail, vector, jnp.float32(1.0 / count))


def _stacked(batches: Sequence[dict], batch_loss: BatchLoss, params: PyTree
             ) -> tuple[dict, tuple[dict, ...], float]:
  """(the leading batches of the first one's shapes, stacked on a new axis; the others, e.g. a
  last batch without its padding; the examples they all count, a Python float). The stacked
  ones are a loop in `_summed_hvp`, the others unrolled: only the last batch should differ."""
  if not batches:
    raise ValueError("no batches: the loss needs at least one example")
  def shapes(batch):
    return tuple((k, np.shape(v)) for k, v in sorted(batch.items()))
  alike = 1
  while alike < len(batches) and shapes(batches[alike]) == shapes(batches[0]):
    alike += 1
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches[:alike])
  count = sum(float(batch_loss(params, batch)[1]) for batch in batches)
  return stacked, tuple(batches[alike:]), count


@functools.partial(jax.jit, static_argnums=0)
def _summed_hvp(batch_loss, params, stacked, tail, vector, inverse_count):
  """(sum over the stacked batches, batch after batch, then over the `tail` batches, of H_b v)
  / count, in one program; H_b the Hessian of batch b's *summed* loss."""
  def batch_hvp(batch):
    grad = jax.grad(lambda p: batch_loss(p, batch)[0])
    return jax.jvp(grad, (params,), (vector,))[1]
  def add(total, batch):
    return otu.tree_add(total, batch_hvp(batch)), None
  first = jax.tree.map(lambda x: x[0], stacked)
  rest = jax.tree.map(lambda x: x[1:], stacked)
  total, _ = jax.lax.scan(add, batch_hvp(first), rest)
  for batch in tail:
    total = otu.tree_add(total, batch_hvp(batch))
  return otu.tree_scale(inverse_count, total)


@jax.jit
def _rayleigh_and_norm(v: PyTree, hv: PyTree) -> tuple[jax.Array, jax.Array]:
  """(<v, Hv>, ||Hv||) in one program."""
  return otu.tree_vdot(v, hv), _tree_norm(hv)


@jax.jit
def _scaled(scale: jax.Array, tree: PyTree) -> PyTree:
  return otu.tree_scale(scale, tree)


def hessian_top_eigenvalue(batch_loss: BatchLoss, params: PyTree, batches: Sequence[dict], *,
                           key: jax.Array, iterations: int = 20, tolerance: float = 0.0) -> dict:
  """Largest-magnitude eigenvalue of the Hessian of the mean loss over `batches` (w.r.t. params).

  Power iteration v <- H v / ||H v|| from a Gaussian start; the estimate is the Rayleigh
  quotient v^T H v of the last unit vector (at a minimum, the top eigenvalue, >= 0). At most
  `iterations`; with `tolerance` > 0, it stops once the estimate's relative change is below it
  (PyHessian's rule; a Hessian-vector product costs a forward and two backward passes).
  Returns {'eigenvalue': float, 'relative_change': |last - previous| / |last| (convergence),
  'iterations': int}.
  """
  v = jax.jit(_gaussian_like)(params, key)
  v = otu.tree_scale(1.0 / _tree_norm(v), v)
  stacked, tail, count = _stacked(batches, batch_loss, params)
  inverse_count = jnp.float32(1.0 / count)
  estimate, previous, done = float("nan"), float("nan"), 0
  # Each iteration is three compiled calls (the products over all batches, <v, Hv> and ||Hv||,
  # the scaling): eager tree arithmetic cost ~0.1 s an iteration in dispatches.
  for done in range(1, iterations + 1):
    hv = _summed_hvp(batch_loss, params, stacked, tail, v, inverse_count)
    rayleigh, norm = _rayleigh_and_norm(v, hv)
    previous, estimate = estimate, float(rayleigh)
    norm = float(norm)
    if norm == 0.0:
      break
    if abs(estimate - previous) < tolerance * abs(estimate):
      break
    v = _scaled(jnp.float32(1.0 / norm), hv)
  change = abs(estimate - previous) / max(abs(estimate), 1e-30)
  return {"eigenvalue": estimate, "relative_change": float(change), "iterations": done}
