"""A run never loses work: a damaged newest checkpoint is set aside for an older one (and kept),
a resume that changes what the checkpoint means is refused, a failed save says what to do, and a
diverging run stops at the first bad step or rolls back and skips, reproducibly."""
import errno
import os
import shutil

import jax
import numpy as np
import pytest

from kdiff_jax import actions, checkpoint, state as state_lib, train
from tests.test_train import poison, tiny_config

# pytest-xdist runs the tests that share this module's fixtures on one worker.
pytestmark = pytest.mark.xdist_group("checkpoint")


ONE = jax.devices()[:1]   # what is tested here needs no mesh; one device is twice as fast


def config_6_steps(**training):
  config = tiny_config()
  config.training.num_steps = 6
  config.training.update(training)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 6-step run with checkpoints at steps 2, 4 and 6: (config, workdir)."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  config = config_6_steps()
  train.train_and_evaluate(config, workdir, devices=ONE)
  return config, workdir


def _largest_file(directory):
  files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _empty_dir(path):
  shutil.rmtree(path)
  os.mkdir(path)


# name -> (the item damaged, the damage done to step directory `step`)
DAMAGES = {
    "deleted-tree-metadata": ("params", lambda step: os.remove(os.path.join(step, "params", "_METADATA"))),
    "deleted-manifest": ("opt_state", lambda step: os.remove(os.path.join(step, "opt_state", "manifest.ocdbt"))),
    "truncated-metadata": ("ema", lambda step: _truncate(os.path.join(step, "ema", "_METADATA"))),
    "truncated-data-file": ("params", lambda step: _truncate(_largest_file(os.path.join(step, "params")))),
    "empty-item-directory": ("params", lambda step: _empty_dir(os.path.join(step, "params"))),
    "deleted-data-position": ("data", lambda step: os.remove(os.path.join(step, "data", "metadata"))),
}


def _restore(config, workdir):
  s = train.setup(config, ONE)
  mngr = checkpoint.manager(workdir, config.checkpoint)
  try:
    return checkpoint.restore(mngr, s.abstract_state)
  finally:
    mngr.close()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_newest_checkpoint_is_set_aside_for_the_next_older(trained, tmp_path, damage):
  config, original = trained
  workdir = str(tmp_path / "run")
  shutil.copytree(original, workdir)
  root = os.path.join(workdir, "checkpoints")
  item, apply = DAMAGES[damage]
  apply(os.path.join(root, "6"))
  assert checkpoint.damage(os.path.join(root, "6")) or damage == "truncated-data-file"

  # sample / eval / export read one item of weights: they skip step 6 (moving nothing) when
  # that item is damaged, and use it when the damage is elsewhere.
  weights = state_lib.Weights(config, train.setup(config, ONE).mesh)
  params, step = weights.restore(workdir, use_ema=item == "ema")
  assert step == (4 if item in ("params", "ema") else 6)
  assert os.path.isdir(os.path.join(root, "6"))

  restored, position = _restore(config, workdir)                  # training: set it aside
  assert int(restored["step"]) == 4 and position == 4
  assert sorted(os.listdir(root)) == ["2", "4", "6.damaged"]
  mngr = checkpoint.manager(original, config.checkpoint)
  expected, _ = checkpoint.restore(mngr, train.setup(config, ONE).abstract_state, step=4)
  mngr.close()
  for x, y in zip(jax.tree.leaves(jax.device_get(expected)), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(x, y)
  if step == 4:
    read = expected["ema"]["0.9"] if item == "ema" else expected["params"]
    for x, y in zip(jax.tree.leaves(jax.device_get(read)), jax.tree.leaves(jax.device_get(params))):
      np.testing.assert_array_equal(x, y)


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(trained, tmp_path):
  config, original = trained
  workdir = str(tmp_path / "run")
  shutil.copytree(original, workdir)
  for step in ("2", "4", "6"):
    os.remove(os.path.join(workdir, "checkpoints", step, "params", "_METADATA"))
  with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint under .* restores "
                                                       r"\(step 6: .*_METADATA is missing"):
    train.train_and_evaluate(config, workdir, devices=ONE)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
      "2.damaged", "4.damaged", "6.damaged"]


def test_a_resume_that_changes_the_run_is_refused_before_anything_is_read(trained, tmp_path):
  config, original = trained
  workdir = str(tmp_path / "run")
  shutil.copytree(original, workdir)
  changed = config_6_steps()
  changed.training.batch_size = 32
  changed.training.num_steps = 8
  with pytest.raises(ValueError, match=r"training.batch_size: 16 -> 32.*"
                                       r"--allow_config_change=training.batch_size"):
    train.train_and_evaluate(changed, workdir, devices=ONE)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
  longer = config_6_steps(num_steps=8)   # a safe change: two more steps
  assert int(train.train_and_evaluate(longer, workdir, devices=ONE)["step"]) == 8


def test_a_failed_save_names_the_step_the_newest_intact_checkpoint_and_the_size(tmp_path,
                                                                                monkeypatch):
  save = checkpoint.save
  def full_disk(mngr, step, *args):
    if step == 4:
      raise OSError(errno.ENOSPC, "No space left on device")
    return save(mngr, step, *args)
  monkeypatch.setattr(checkpoint, "save", full_disk)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"saving checkpoint step 4 failed \(OSError: \[Errno 28\] No space left "
                           r"on device\); the newest intact checkpoint is step 2 under .*; a save "
                           r"writes about [\d.]+ MiB"):
    train.train_and_evaluate(config_6_steps(), str(tmp_path), devices=ONE)


def test_divergence_stops_naming_the_step_what_went_wrong_and_what_to_do(tmp_path, monkeypatch):
  poison(monkeypatch, 3)
  with pytest.raises(actions.NonFiniteLossError,
                     match=r"non-finite loss nan, gradient norm nan, first non-finite gradient: "
                           r"\['net'\].* at step 3; the newest checkpoint, step 2, holds the last "
                           r"good state.*training.on_nonfinite='rollback_skip'"):
    train.train_and_evaluate(config_6_steps(log_every=1), str(tmp_path), devices=ONE)


def test_rollback_skip_is_reproducible(tmp_path, monkeypatch):
  """The batch of position 4 (step 4) is NaN: both runs go back to step 2, skip batches 3 and 4,
  and end with the same parameters, having read 8 batches for 6 steps."""
  poison(monkeypatch, 4)
  config = config_6_steps(log_every=1, on_nonfinite="rollback_skip", max_rollbacks=1)
  finals = [jax.device_get(train.train_and_evaluate(config, str(tmp_path / run), devices=ONE))
            for run in ("a", "b")]
  for x, y in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
    np.testing.assert_array_equal(x, y)
  assert int(finals[0]["step"]) == 6
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(finals[0]["params"]))
  mngr = checkpoint.manager(str(tmp_path / "a"), config.checkpoint)
  _, position = checkpoint.restore(mngr, train.setup(config, ONE).abstract_state)
  mngr.close()
  assert position == 8
  config.training.max_rollbacks = 0   # no rollback left: the same run stops
  with pytest.raises(actions.NonFiniteLossError, match="max_rollbacks=0 rollbacks are used up"):
    train.train_and_evaluate(config, str(tmp_path / "c"), devices=ONE)
