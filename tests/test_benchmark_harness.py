"""launch.benchmark at a tiny size: the JSON it promises, no recompiles, no TensorFlow.

Runs in subprocesses (the benchmark defines absl flags and must start with its own imports), on
the 8 CPU devices and fast compiles that conftest.py puts in the environment. No timing asserts:
only that the numbers exist and have the right types.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

from reinit import methods

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_TINY = ["--model=simple_cnn", "--width=0.125", "--batch_size=16", "--image_size=8",
         "--steps=2", "--repeats=2"]
_NUMBERS = ("train_images_per_s", "train_step_ms", "eval_images_per_s", "reinit_transform_ms",
            "reinit_transform_over_train_step", "peak_memory_mb", "train_flops_per_image")


def _run(args, timeout=120):
  return subprocess.run([sys.executable, *args], cwd=_ROOT, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ), check=False)


def test_prints_the_promised_json_with_no_recompiles_and_no_tensorflow():
  out = _run(["-m", "launch.benchmark", *_TINY])
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])

  assert result["model"] == "simple_cnn"
  assert (result["batch_size"], result["image_size"]) == (16, 8)
  assert result["backend"] == "cpu" and result["devices"] >= 1
  for key in _NUMBERS:
    assert isinstance(result[key], float) and result[key] > 0, (key, result[key])
  assert len(result["train_step_ms_repeats"]) == 2
  assert result["stage_switch_recompiles"] == 0
  assert result["stage_switch_recompiles_by_method"] == {m: 0 for m in methods.METHODS}
  assert result["input_pipeline_ratio"] is None  # no --dataset
  assert result["mfu"] is None  # CPU
  assert result["imported_tf"] is False


def test_counts_the_recompiles_of_a_switch_that_changes_a_dtype():
  # A broken LW switch that leaves the standardizations in bfloat16: the train and eval steps
  # must recompile, and the count must say so.
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp
      from launch import benchmark
      from configs import benchmark as configs
      from reinit import methods

      def to_bf16(variables):
        norm = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables["norm"])
        return {**variables, "norm": norm}

      methods.lw.deactivate_standardizations = to_bf16
      config = configs.get_config("model=simple_cnn,method=lw")
      config.update(width=0.125, image_size=8)
      counts = benchmark.switch_recompiles(config, (8, 8, 3), 10, ["lw"],
                                           benchmark.CompileCounter())
      print(counts["lw"])
  """)
  out = _run(["-c", script])
  assert out.returncode == 0, out.stderr[-3000:]
  assert int(out.stdout.strip().splitlines()[-1]) >= 1


def test_a_bad_flag_is_one_line():
  out = _run(["-m", "launch.benchmark", "--model=nope"])
  assert out.returncode == 2
  assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: "), out.stderr
