"""The trainer under preemption and misuse: exact resume, corrupt checkpoints, workdir claims,
divergence, and the same losses on 1 and 8 devices."""

import os

import jax
import numpy as np
import pytest

from configs import digits as digits_config
from reinit import train
from reinit import workdir as workdir_lib


class Preempted(Exception):
  """Stands for a kill: raised from inside the training loop after a number of batches."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir, **overrides):
  config = digits_config.get_config("method=lw")
  config.data_dir = data_dir
  config.width = 0.125
  config.train_examples = 60
  config.batch_size = 16  # 4 steps per epoch
  config.epochs_per_stage = 2  # 8 steps per stage
  config.num_stages = 3
  config.checkpoint_every_steps = 3
  for key, value in overrides.items():
    config[key] = value
  return config


def _preempt_after(monkeypatch, batches: int):
  """Makes the trainer stop (as if killed) when it asks for batch number `batches + 1`."""
  real = train.global_batch
  calls = {"n": 0}

  def counting(batch, sharding):
    if "mask" not in batch:  # training batches only, not evaluation ones
      calls["n"] += 1
      if calls["n"] > batches:
        raise Preempted()
    return real(batch, sharding)
  monkeypatch.setattr(train, "global_batch", counting)


@pytest.fixture(scope="module")
def unbroken(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("unbroken"))
  return train.train_and_evaluate(_config(data_dir), workdir)


def _comparable(results):
  return [{k: v for k, v in stage.items()} for stage in results["stages"]]


@pytest.mark.parametrize("stop_at", [10, 16])  # mid-stage (after a checkpoint at 9), stage end
def test_resumed_run_equals_unbroken_run(data_dir, unbroken, tmp_path, monkeypatch, stop_at):
  workdir = str(tmp_path)
  with monkeypatch.context() as patch:
    _preempt_after(patch, stop_at)
    with pytest.raises(Preempted):
      train.train_and_evaluate(_config(data_dir), workdir)
  assert not os.path.exists(os.path.join(workdir, train.RESULTS_FILE))
  resumed = train.train_and_evaluate(_config(data_dir), workdir)
  restored_step = {10: 9, 16: 16}[stop_at]
  assert resumed["resumed_from"] == [restored_step]
  assert _comparable(resumed) == _comparable(unbroken)  # bit-identical accuracies and losses
  # Started again once finished, it returns the same results without training.
  assert train.train_and_evaluate(_config(data_dir), workdir)["stages"] == resumed["stages"]


def test_corrupt_latest_checkpoint_falls_back(data_dir, unbroken, tmp_path, monkeypatch, caplog):
  workdir = str(tmp_path)
  with monkeypatch.context() as patch:
    _preempt_after(patch, 13)  # checkpoints at steps 6 and 9 (mid-stage 1), 8 (stage end), 12
    with pytest.raises(Preempted):
      train.train_and_evaluate(_config(data_dir), workdir)
  checkpoints = os.path.join(workdir, train.CHECKPOINT_DIR)
  steps = sorted(int(name) for name in os.listdir(checkpoints) if name.isdigit())
  assert steps == [8, 9, 12]  # max_to_keep=3
  latest, previous = steps[-1], steps[-2]
  for root, _, files in os.walk(os.path.join(checkpoints, str(latest), "state")):
    for name in files:  # truncate every array file: a half-written checkpoint
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(7)
  resumed = train.train_and_evaluate(_config(data_dir), workdir)
  assert resumed["resumed_from"] == [previous]
  assert any("unreadable" in r.getMessage() for r in caplog.records)
  assert _comparable(resumed) == _comparable(unbroken)


def test_workdir_with_another_config_is_refused(data_dir, unbroken, tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(_config(data_dir, num_stages=1), workdir)
  with open(os.path.join(workdir, train.CONFIG_FILE)) as f:
    recorded = f.read()
  listing = sorted(os.listdir(workdir))
  with pytest.raises(train.ConfigError, match=r"different config \(fields: seed\)"):
    train.train_and_evaluate(_config(data_dir, num_stages=1, seed=3), workdir)
  with open(os.path.join(workdir, train.CONFIG_FILE)) as f:
    assert f.read() == recorded
  assert sorted(os.listdir(workdir)) == listing
  # Bookkeeping fields may change between attempts.
  train.train_and_evaluate(_config(data_dir, num_stages=1, log_every_steps=7), workdir)


def test_a_workdir_recorded_before_a_config_field_existed_is_claimed_at_its_old_value(
    tmp_path):
  """A config.json written before `sp.reset_batch_stats` existed recorded what False does: the
  same config claims it (a stopped run resumes); True is another config."""
  from configs import digits as digits_config
  from reinit import workdir as workdir_lib
  config = digits_config.get_config("method=sp")
  recorded = config.to_dict()
  del recorded["sp"]["reset_batch_stats"]
  workdir_lib.write_json_atomically(workdir_lib.path(str(tmp_path), train.CONFIG_FILE), recorded)
  workdir_lib.claim(config, str(tmp_path))
  config.sp.reset_batch_stats = True
  with pytest.raises(train.ConfigError, match=r"different config \(fields: sp.reset_batch_st"):
    workdir_lib.claim(config, str(tmp_path))


def test_non_finite_loss_stops_and_keeps_good_checkpoints(data_dir, tmp_path):
  workdir = str(tmp_path)
  config = _config(data_dir, learning_rate=1e30, checkpoint_every_steps=1, log_every_steps=100)
  with pytest.raises(train.TrainingDiverged, match=r"stage 0, step \d+"):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, train.RESULTS_FILE))
  checkpoints = os.path.join(workdir, train.CHECKPOINT_DIR)
  manager = workdir_lib.checkpoint_manager(workdir)
  assert manager.all_steps(), "the good steps before divergence were checkpointed"
  state, _ = workdir_lib.restore_latest(manager, workdir_lib.abstract(_any_state(config)))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.variables))
  assert os.path.isdir(checkpoints)


def _any_state(config):
  from reinit import methods  # pylint: disable=g-import-not-at-top
  plan = methods.make_plan(config, [f"block{i}" for i in range(6)] + ["head"])
  runtime = train.build_runtime(config, 10, (8, 8, 1), plan)
  variables = runtime.init(jax.random.key(0))
  return train.TrainState(jax.numpy.zeros((), jax.numpy.int32), variables,
                          runtime.tx.init(variables["params"]),
                          plan.begin(variables, jax.random.key(0)))


def test_one_and_eight_devices_give_the_same_losses(data_dir, tmp_path):
  assert jax.device_count() == 8
  one = train.train_and_evaluate(_config(data_dir, num_devices=1, num_stages=2),
                                 str(tmp_path / "one"))
  eight = train.train_and_evaluate(_config(data_dir, num_devices=8, num_stages=2),
                                   str(tmp_path / "eight"))
  assert one["devices"] == 1 and eight["devices"] == 8
  for a, b in zip(one["stages"], eight["stages"]):
    for key in ("train_loss", "test_loss"):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-4, err_msg=key)


def test_inconsistent_checkpoint_is_not_restored(data_dir, tmp_path, caplog):
  """A checkpoint whose progress does not match its state (say, progress written after the
  loop moved on) would resume at the wrong batch: it is moved aside like a corrupt one."""
  config = _config(data_dir)
  state = _any_state(config)
  manager = workdir_lib.checkpoint_manager(str(tmp_path))
  good = {"global_step": 0, "stage": 0, "step_in_stage": 0}
  workdir_lib.save_checkpoint(manager, state, good)
  stale = state.replace(step=state.step + 5)  # state at step 5 ...
  workdir_lib.save_checkpoint(
      manager, stale, {"global_step": 7, "stage": 0, "step_in_stage": 7})  # ... saved as 7
  manager.wait_until_finished()
  assert manager.all_steps() == [0, 7]
  restored, progress = workdir_lib.restore_latest(manager, workdir_lib.abstract(state))
  assert progress == good and int(restored.step) == 0
  assert manager.all_steps() == [0]
  assert os.listdir(tmp_path / "corrupt_checkpoints")
  assert any("inconsistent checkpoint" in r.getMessage() for r in caplog.records)
