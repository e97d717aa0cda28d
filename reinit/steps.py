"""One training step and its optimizer: pure functions of a run config, shared by a single
run and a vmapped group of runs.

  TrainState              the whole training state, a pytree checkpointed as it is
  make_optimizer          SGD (Nesterov) with weight decay, learning rate injected per step
  stage_learning_rates    each stage's warmup + cosine schedule, step by step
  make_train_step         `(state, batch, learning_rate) -> (state, metrics)`
"""

import functools
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from reinit import methods
from reinit import tree as tree_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """The whole training state; a pytree of arrays, checkpointed as it is.

  step: global step (int32 scalar). variables: linen variables (params, batch_stats, norm).
  opt_state: optax state. memory: the method's bookkeeping (`methods.Plan.begin`).
  """
  step: jax.Array
  variables: PyTree
  opt_state: PyTree
  memory: PyTree


class OptimizerFields(NamedTuple):
  """The config fields `make_optimizer` reads: hashable, so that the programs built on an
  optimizer can be shared by the runs of a process that agree on them."""
  weight_decay: float
  momentum: float
  nesterov: bool


def optimizer_fields(config) -> OptimizerFields:
  return OptimizerFields(*(config[field] for field in OptimizerFields._fields))


def make_optimizer(config) -> optax.GradientTransformation:
  """SGD (Nesterov) with weight decay on kernels.

  The learning rate is an injected hyperparameter: the train step sets it from the stage's
  schedule, so every stage (whatever its length or peak) uses the same compiled step. Reads
  only the fields of `OptimizerFields` (compiled programs are shared by them).
  """
  def sgd(learning_rate):
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=tree_lib.kernels),
        optax.sgd(learning_rate, momentum=config.momentum or None, nesterov=config.nesterov))
  return optax.inject_hyperparams(sgd)(learning_rate=0.0)


def warmup_cosine(config, *, peak: float, steps: int, steps_per_epoch: int) -> np.ndarray:
  """Learning rate of each of `steps` steps: linear warmup, then cosine decay to 0. (steps,) f32."""
  warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), max(steps - 1, 0))
  return _warmup_cosine(float(peak), warmup, steps)


@functools.lru_cache(maxsize=64)
def _warmup_cosine(peak: float, warmup: int, steps: int) -> np.ndarray:
  # Once per process and schedule: the runs and groups of a sweep share their schedules.
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(steps, 1))
  # Evaluated op by op on a power-of-two number of steps, then cut: every schedule of up to
  # that many steps reuses the same compiled ops (the schedule's constants are operands, not
  # part of the program), where each new length compiled them all again (~0.2 s a schedule;
  # a sweep over training-set sizes has dozens). Elementwise, so the values are the same.
  length = max(64, 1 << (max(steps, 1) - 1).bit_length())
  rates = np.asarray(jax.vmap(schedule)(jnp.arange(length)), np.float32)[:steps]
  rates.flags.writeable = False  # shared by every caller
  return rates


def stage_learning_rates(config, plan: methods.Plan, steps_per_epoch: int) -> list[np.ndarray]:
  """Per stage, the learning rate of each of its steps.

  With `restart_schedule`, every stage runs its own warmup + cosine at its own peak; without,
  one schedule spans all stages (each stage's peak then scales its slice).
  """
  steps = [e * steps_per_epoch for e in plan.epochs]
  if config.restart_schedule:
    return [warmup_cosine(config, peak=peak, steps=n, steps_per_epoch=steps_per_epoch)
            for peak, n in zip(plan.learning_rates, steps)]
  whole = warmup_cosine(config, peak=1.0, steps=sum(steps), steps_per_epoch=steps_per_epoch)
  bounds = np.cumsum([0] + steps)
  return [whole[a:b] * peak for a, b, peak in zip(bounds[:-1], bounds[1:], plan.learning_rates)]


def cross_entropy(logits, labels, *, num_classes: int, label_smoothing: float):
  """Mean softmax cross-entropy. logits (B, C) f32, labels (B,) int."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def make_train_step(model, tx, *, num_classes: int, label_smoothing: float):
  """`(state, batch, learning_rate) -> (state, metrics)`; batch: image (B,H,W,C), label (B,).

  `tx.update` is called with the method's memory as the keyword `memory` (a plan's optimizer
  wrapper may read it, e.g. DSD's `methods.hold_at_zero`); a plain optax `tx` ignores it.
  metrics: mean loss and accuracy of the batch, f32 scalars.
  """
  tx = optax.with_extra_args_support(tx)

  def train_step(state: TrainState, batch, learning_rate):
    def loss_fn(params):
      logits, new_state = model.apply({**state.variables, "params": params}, batch["image"],
                                      train=True, mutable=["batch_stats"])
      loss = cross_entropy(logits, batch["label"], num_classes=num_classes,
                           label_smoothing=label_smoothing)
      return loss, (logits, new_state["batch_stats"])

    params = state.variables["params"]
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    opt_state = optax.tree_utils.tree_set(state.opt_state, learning_rate=learning_rate)
    updates, opt_state = tx.update(grads, opt_state, params, memory=state.memory)
    params = optax.apply_updates(params, updates)
    variables = {**state.variables, "params": params, "batch_stats": batch_stats}
    metrics = {"loss": loss,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    return state.replace(step=state.step + 1, variables=variables, opt_state=opt_state), metrics
  return train_step
