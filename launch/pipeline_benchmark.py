r"""Input pipeline vs train step throughput, in images/s: the pipeline must not be the bottleneck.

  python -m launch.pipeline_benchmark [--batches=200] [--batch_size=64] [--train_steps=20]

Prints one JSON line. For each case (the embedded `digits` at its native 8x8 and resized to
32x32, and `cifar10` served by `tfds.testing.mock_data` at 32x32, both with crop_flip), it
iterates `--batches` training batches as numpy after a warm-up of one epoch (which fills the
pipeline's cache), then times `--train_steps` jitted train steps of `simple_cnn` (the step of
reinit/train.py) on a device-resident batch of the same shape. Offline; about a minute on 2 CPU
cores.
"""

import contextlib
import json
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import tensorflow_datasets as tfds

from configs import benchmark
from reinit import data
from reinit import train as train_lib

_BATCHES = flags.DEFINE_integer("batches", 200, "Training batches timed per pipeline.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size of pipeline and step.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 20, "Train steps timed per case.")
_MOCK_EXAMPLES = flags.DEFINE_integer("mock_examples", 2048, "Examples of the mock dataset.")
_MODEL = flags.DEFINE_string("model", "simple_cnn", "Model of the timed train step.")


def case_configs(data_dir: str) -> dict:
  """name -> (config, mocked): the cases timed, all with the CLI's benchmark config."""
  def config(dataset, **overrides):
    c = benchmark.get_config(f"dataset={dataset},model={_MODEL.value},method=baseline")
    c.update(dict(batch_size=_BATCH_SIZE.value, data_dir=data_dir, **overrides))
    return c
  return {
      "digits_8px": (config("digits", train_examples=None), False),
      "digits_32px": (config("digits", train_examples=None, image_size=32,
                             augment="crop_flip"), False),
      "mock_cifar10_32px": (config("cifar10"), True),
  }


def pipeline_images_per_s(train_ds, steps_per_epoch: int, batches: int) -> float:
  """images/s of `batches` numpy batches, after one epoch plus a few batches of warm-up."""
  iterator = train_ds.as_numpy_iterator()
  for _ in range(steps_per_epoch + 5):
    next(iterator)
  start = time.perf_counter()
  images = sum(len(next(iterator)["label"]) for _ in range(batches))
  return images / (time.perf_counter() - start)


def train_step_images_per_s(config, num_classes: int, batch, steps: int) -> float:
  """images/s of `steps` jitted train steps on one device-resident batch (after compiling)."""
  model = train_lib.create_model(config, num_classes)
  tx = train_lib.make_optimizer(config)
  key = jax.random.key(config.seed)
  variables = jax.jit(lambda k: model.init(k, jnp.asarray(batch["image"][:1]), train=False))(key)
  state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), variables=variables,
                               opt_state=tx.init(variables["params"]), memory={})
  step = jax.jit(train_lib.make_train_step(model, tx, num_classes=num_classes,
                                           label_smoothing=config.label_smoothing),
                 donate_argnums=0)
  batch = jax.device_put({"image": batch["image"], "label": batch["label"]})
  learning_rate = jnp.float32(0.01)
  for _ in range(3):  # compile and warm up
    state, metrics = step(state, batch, learning_rate)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, learning_rate)
  jax.block_until_ready((state, metrics))
  return steps * len(batch["label"]) / (time.perf_counter() - start)


def measure(config, mocked: bool) -> dict:
  """Pipeline and train-step images/s of one case."""
  mock = (tfds.testing.mock_data(num_examples=_MOCK_EXAMPLES.value) if mocked
          else contextlib.nullcontext())
  with mock:
    info = data.dataset_info(config)
    train_ds, steps_per_epoch = data.train_dataset(config)
    pipeline = pipeline_images_per_s(train_ds, steps_per_epoch, _BATCHES.value)
    batch = next(train_ds.as_numpy_iterator())
  step = train_step_images_per_s(config, info.num_classes, batch, _TRAIN_STEPS.value)
  return {"image_shape": list(info.image_shape), "train_examples": info.train_examples,
          "augment": config.augment, "pipeline_images_per_s": round(pipeline, 1),
          "train_step_images_per_s": round(step, 1),
          "pipeline_over_step": round(pipeline / step, 2)}


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as data_dir:
    cases = {name: measure(config, mocked)
             for name, (config, mocked) in case_configs(data_dir).items()}
  print(json.dumps({
      "device": str(jax.devices()[0].device_kind), "devices": jax.device_count(),
      "model": _MODEL.value, "batch_size": _BATCH_SIZE.value, "batches": _BATCHES.value,
      "train_steps": _TRAIN_STEPS.value, "cases": cases,
      "pipeline_is_bottleneck": any(c["pipeline_over_step"] < 1 for c in cases.values()),
  }, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
