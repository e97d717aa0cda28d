"""Preemption: SIGTERM/SIGUSR1 make a run checkpoint its current step and exit with status 75;
the same command resumes it and ends as an unbroken run does."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

from reinit import preemption

REPO = pathlib.Path(__file__).resolve().parents[1]
PREEMPTED = 75  # EX_TEMPFAIL, documented in the README and launch/common.py

# 64 examples / batch 16 = 4 steps per epoch; 50 epochs per stage = 200 steps (a few seconds):
# a signal sent once stage 0 is checkpointed lands in a later stage.
STEPS_PER_STAGE = 200
_OVERRIDES = ["--config.train_examples=64", "--config.batch_size=16",
              "--config.epochs_per_stage=50", "--config.num_stages=3", "--config.width=0.25",
              "--config.log_every_steps=100"]


def _main(workdir, data_dir):
  return [sys.executable, "-m", "launch.main", "--config=configs/digits.py:method=lw",
          f"--workdir={workdir}", f"--config.data_dir={data_dir}", *_OVERRIDES]


# A fatal signal in a child prints every thread's Python stack (faulthandler), so that a crash
# shows where it happened, not only the list of extension modules Python prints after it.
_ENV = {**os.environ, "PYTHONFAULTHANDLER": "1"}


def _start(command):
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=_ENV)


def _readable(stderr: str) -> str:
  """The last 3000 characters of a child's stderr, less the extension-module list of a crash."""
  return re.sub(r"\nExtension modules:[^\n]*", "", stderr)[-3000:]


def test_sigterm_mid_run_checkpoints_that_step_and_the_rerun_ends_identical(tmp_path):
  data_dir = tmp_path / "tfds"
  # The digits dataset is built on first use: once, before two processes read it.
  subprocess.run([sys.executable, "-c", "import tensorflow_datasets as tfds; "
                  "import reinit.data.digits; "
                  f"tfds.builder('digits', data_dir='{data_dir}').download_and_prepare()"],
                 cwd=REPO, check=True, capture_output=True, timeout=300)
  unbroken = _start(_main(tmp_path / "unbroken", data_dir))
  broken_dir = tmp_path / "broken"
  broken = _start(_main(broken_dir, data_dir))
  first_stage_end = broken_dir / "checkpoints" / str(STEPS_PER_STAGE)
  deadline = time.monotonic() + 300
  while not first_stage_end.exists() and broken.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  broken.send_signal(signal.SIGTERM)
  _, stderr = broken.communicate(timeout=300)
  assert broken.returncode == PREEMPTED, _readable(stderr)
  step = int(re.search(r"error: preempted at step (\d+)", stderr).group(1))
  assert STEPS_PER_STAGE < step < 3 * STEPS_PER_STAGE
  assert (broken_dir / "checkpoints" / str(step)).is_dir()
  assert not (broken_dir / "results.json").exists()

  rerun = subprocess.run(_main(broken_dir, data_dir), cwd=REPO, capture_output=True, text=True,
                         timeout=600, env=_ENV)
  assert rerun.returncode == 0, _readable(rerun.stderr)
  _, unbroken_err = unbroken.communicate(timeout=600)
  assert unbroken.returncode == 0, _readable(unbroken_err)
  resumed = json.loads((broken_dir / "results.json").read_text())
  reference = json.loads((tmp_path / "unbroken" / "results.json").read_text())
  assert resumed["resumed_from"] == [step] and reference["resumed_from"] == []
  for key in ("stages", "test_accuracy", "train_accuracy", "compute"):
    assert resumed[key] == reference[key], key


def test_notice_flags_either_signal_and_restores_the_previous_handlers():
  received = []
  previous = signal.signal(signal.SIGUSR1, lambda *_: received.append("mine"))
  try:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
      before = signal.getsignal(sig)
      notice = preemption.Notice()
      assert not notice.reached(7)
      os.kill(os.getpid(), sig)
      assert notice.reached(7) and notice.signal == sig
      notice.restore()
      assert signal.getsignal(sig) is before
    os.kill(os.getpid(), signal.SIGUSR1)
    assert received == ["mine"]  # the handler installed before the notice is back
  finally:
    signal.signal(signal.SIGUSR1, previous)
