"""Evaluation of a run's variables on a split: clu metrics over padded, masked batches.

`make_eval_step` returns a `clu.metrics.Collection` per batch (only the real examples count,
by the batch's `mask`); `evaluate` merges them over the split and reads the totals.
"""

from typing import Any

from clu import metrics as clu_metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


def _correct(logits, label, **_):
  return (jnp.argmax(logits, -1) == label).astype(jnp.float32)


def _memorized(logits, label, mask, corrupted, **_):
  """Corrupted examples predicted as their (wrong) training label: fitted noise."""
  return {"values": _correct(logits, label), "mask": mask * corrupted}


def _clean_accuracy(logits, label, mask, corrupted, **_):
  return {"values": _correct(logits, label), "mask": mask * (1 - corrupted)}


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  accuracy: clu_metrics.Average.from_fun(_correct)
  loss: clu_metrics.Average.from_output("loss")


@flax.struct.dataclass
class NoisyEvalMetrics(clu_metrics.Collection):
  """Under label noise (the batch carries `corrupted`): also memorization and clean accuracy.
  (All fields spelled out: a clu Collection reads only its own class's annotations.)"""
  accuracy: clu_metrics.Average.from_fun(_correct)
  loss: clu_metrics.Average.from_output("loss")
  memorized: clu_metrics.Average.from_fun(_memorized)
  clean_accuracy: clu_metrics.Average.from_fun(_clean_accuracy)


def make_eval_step(model, *, num_classes: int):
  """`(variables, batch) -> EvalMetrics` of the real examples of a padded batch.

  The batch has image (B, H, W, C), label (B,) and mask (B,) (1 real, 0 padding), and may
  carry `corrupted` (B,) (label noise): the metrics then also count memorized corrupted
  examples and the accuracy on the clean ones.
  """
  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], num_classes))
    collection = NoisyEvalMetrics if "corrupted" in batch else EvalMetrics
    return collection.single_from_model_output(
        logits=logits, label=batch["label"], loss=loss, mask=batch["mask"],
        **({"corrupted": batch["corrupted"]} if "corrupted" in batch else {}))
  return eval_step


def _mean(average: clu_metrics.Average) -> float:
  # The device totals divided in Python (float64), as results.json always had them;
  # Average.compute() would divide in float32.
  return float(average.total) / float(average.count)


def evaluate(eval_step, variables: PyTree, batches) -> dict[str, float]:
  """Accuracy, mean loss and example count over `batches` (global padded batches).

  Under label noise also `memorized` (fraction of corrupted examples fitted to their wrong
  label) and `clean_accuracy`.
  """
  return summary(merged(eval_step, variables, batches))


def merged(eval_step, variables: PyTree, batches, fetch=jax.device_get) -> EvalMetrics:
  """The eval step's metrics merged over `batches`, on the host (numpy totals, read by `fetch`:
  e.g. a gather from every process where each holds part of them)."""
  totals = None
  for batch in batches:
    metrics = eval_step(variables, batch)
    totals = metrics if totals is None else totals.merge(metrics)
  return fetch(totals)


def summary(totals: EvalMetrics) -> dict[str, float]:
  """`evaluate`'s dict of merged metrics: accuracy, mean loss, example count (and under label
  noise `memorized` and `clean_accuracy`)."""
  out = {"accuracy": _mean(totals.accuracy), "loss": _mean(totals.loss),
         "examples": int(totals.accuracy.count)}
  if isinstance(totals, NoisyEvalMetrics) and int(totals.memorized.count):
    out |= {"memorized": _mean(totals.memorized), "clean_accuracy": _mean(totals.clean_accuracy)}
  return out


_RESIDENT_EVAL_BYTES = 256 * 2**20


class EvalSet:
  """An evaluation split as global batches; kept on the devices when it is small.

  Evaluating after every stage re-reads the split; a split under 256 MiB per process is kept
  from its first pass on, which saves the tf.data start-up and the host-to-device copies at
  every later stage end.

  Args:
    dataset: a tf.data.Dataset of host-local padded batches.
    to_global: host-local numpy batch -> global jax arrays.
  """

  def __init__(self, dataset, to_global):
    self._dataset, self._to_global = dataset, to_global
    self._resident: list | None = None
    self._too_big = False

  def __iter__(self):
    if self._resident is not None:
      yield from self._resident
      return
    kept, size = [], 0
    for batch in self._dataset.as_numpy_iterator():
      size += sum(np.asarray(x).nbytes for x in batch.values())
      self._too_big |= size > _RESIDENT_EVAL_BYTES
      batch = self._to_global(batch)
      if not self._too_big:
        kept.append(batch)
      yield batch
    if not self._too_big:
      self._resident = kept
