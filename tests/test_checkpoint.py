"""A run never loses work: a damaged newest checkpoint is set aside for an older one (and kept),
a resume that changes what the checkpoint means is refused, a failed save says what to do, and a
diverging run stops at the first bad step or rolls back and skips, reproducibly."""
import errno
import os
import re
import shutil

import jax
import numpy as np
import pytest

from kdiff_jax import actions, checkpoint, state as state_lib, train, train_state
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
    "nothing-inside": ("params", lambda step: (shutil.rmtree(step), os.makedirs(os.path.join(step, "params")))),
}


def _restore(config, workdir):
  setup = train_state.setup(config, ONE)
  mngr = checkpoint.manager(workdir, config.checkpoint)
  try:
    return checkpoint.restore(mngr, setup.abstract_state)
  finally:
    mngr.close()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_newest_checkpoint_is_set_aside_for_the_next_older(trained, tmp_path, damage,
                                                                     capfd):
  config, original = trained
  workdir = str(tmp_path / "run")
  shutil.copytree(original, workdir)
  root = os.path.join(workdir, "checkpoints")
  item, apply = DAMAGES[damage]
  apply(os.path.join(root, "6"))
  assert checkpoint.damage(os.path.join(root, "6")) or damage == "truncated-data-file"

  # sample / eval / export read one item of weights: they skip step 6 (moving nothing) when
  # that item is damaged, and use it when the damage is elsewhere.
  weights = state_lib.Weights(config, train_state.setup(config, ONE).mesh)
  params, step = weights.restore(workdir, use_ema=item == "ema")
  assert step == (4 if item in ("params", "ema") else 6)
  assert os.path.isdir(os.path.join(root, "6"))

  capfd.readouterr()
  restored, position = _restore(config, workdir)                  # training: set it aside
  assert int(restored["step"]) == 4 and position == 4
  said = capfd.readouterr().out.strip().splitlines()   # one line: the step and the cause
  assert len(said) == 1 and re.search(r"checkpoint step 6 is damaged \((.*/6/\w+.* is |the data "
                                      r"of its '\w+' item does not read)", said[0]), said
  assert len(said[0]) < 300 + len(workdir), said
  assert sorted(os.listdir(root)) == ["2", "4", "6.damaged"]
  mngr = checkpoint.manager(original, config.checkpoint)
  expected, _ = checkpoint.restore(mngr, train_state.setup(config, ONE).abstract_state, step=4)
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


def test_a_step_folder_with_nothing_inside_is_set_aside_and_the_run_resumes(trained, tmp_path,
                                                                             capfd):
  """checkpoints/6 holds an empty params/ and no config: the run names it, moves it aside and
  resumes from step 4 (reading step 4's config), and the readers of a run's config skip it."""
  config, original = trained
  workdir = str(tmp_path / "run")
  shutil.copytree(original, workdir)
  root = os.path.join(workdir, "checkpoints")
  DAMAGES["nothing-inside"][1](os.path.join(root, "6"))
  assert checkpoint.load_config(workdir).training.num_steps == 6   # step 4's config
  final = train.train_and_evaluate(config_6_steps(num_steps=8), workdir, devices=ONE)
  assert int(final["step"]) == 8
  out = capfd.readouterr().out
  assert re.search(r"checkpoint step 6 is damaged \(.*/checkpoints/6/params is empty\); moved "
                   r"it to .*/checkpoints/6.damaged", out), out
  assert "resumed from step 4" in out, out
  assert {"6.damaged", "6", "8"} <= set(os.listdir(root))   # 6 written again, the old kept


class FullDiskAt:
  """A checkpoint manager whose save of `step` fails like a full disk: at once (sync), or in the
  background, seen when the loop asks whether it has finished (async). Other saves are real."""

  def __init__(self, manager, step: int, in_background: bool):
    self.manager, self.step, self.in_background = manager, step, in_background
    self.failed = False

  def __getattr__(self, name):
    return getattr(self.manager, name)

  def save(self, step, **kwargs):
    if step != self.step:
      return self.manager.save(step, **kwargs)
    if not self.in_background:
      raise OSError(errno.ENOSPC, "No space left on device")
    self.failed = True   # nothing is written; the error surfaces when Orbax finishes

  def is_saving_in_progress(self):
    return False if self.failed else self.manager.is_saving_in_progress()

  def wait_until_finished(self):
    if self.failed:
      self.failed = False
      raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/w/checkpoints/4.orbax-"
                       "checkpoint-tmp/params/_sharding\": Failed writing: [os_error_code='28']")
    return self.manager.wait_until_finished()


@pytest.mark.parametrize("in_background", [False, True], ids=["sync", "async"])
def test_a_full_disk_stops_at_the_next_step_naming_the_save_that_failed(tmp_path, monkeypatch,
                                                                        capfd, in_background):
  """The save of step 4 fails: the run stops at once (sync) or at the next step boundary (async,
  after step 5, not at the next save), names step 4, the disk, the newest intact checkpoint,
  step 2, and never announces step 4 as written."""
  manager = checkpoint.manager
  monkeypatch.setattr(checkpoint, "manager", lambda *args: FullDiskAt(manager(*args), 4,
                                                                      in_background))
  config = config_6_steps(log_every=1, num_steps=12)
  config.checkpoint.async_save = in_background
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"^saving checkpoint step 4 failed \(no space left on device\); the "
                           r"newest intact checkpoint is step 2 under .*; a save writes about "
                           r"[\d.]+ MiB: free that much space"):
    train.train_and_evaluate(config, str(tmp_path), devices=ONE)
  out = capfd.readouterr().out
  logged = [int(step) for step in re.findall(r"step (\d+)/12", out)]
  assert max(logged) == (5 if in_background else 4), out
  assert re.findall(r"checkpoint step (\d+) ->", out) == ["2"], out


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
  _, position = checkpoint.restore(mngr, train_state.setup(config, ONE).abstract_state)
  mngr.close()
  assert position == 8
  config.training.max_rollbacks = 0   # no rollback left: the same run stops
  with pytest.raises(actions.NonFiniteLossError, match="max_rollbacks=0 rollbacks are used up"):
    train.train_and_evaluate(config, str(tmp_path / "c"), devices=ONE)


def test_save_errors_are_said_in_a_few_words():
  """A full disk is named wherever it sits in the error's chain (an OSError, TensorStore's
  os_error_code 28); anything else keeps its type and its first line, cut to 160 characters."""
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as disk:
      raise RuntimeError("commit failed") from disk
  except RuntimeError as wrapped:
    assert checkpoint.describe_error(wrapped) == checkpoint.NO_SPACE
  assert checkpoint.describe_error(ValueError(
      "RESOURCE_EXHAUSTED: Failed to write 16137 bytes to file 12 [os_error_code='28']")) == (
          checkpoint.NO_SPACE)
  said = checkpoint.describe_error(PermissionError(13, "x" * 400 + "\nsecond line"))
  assert said.startswith("PermissionError: [Errno 13] xxx") and said.endswith("...")
  assert len(said) == len("PermissionError: ") + 160
