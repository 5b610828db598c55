"""The modes after training (--mode=sample, eval, export) read only the sampling weights and the
run's own config: they work on a checkpoint whose optimizer state has been deleted, with no
--config on the command line (overrides still apply)."""
import os
import shutil
import subprocess
import sys

import pytest

from kdiff_jax import checkpoint, train_state
from tests.conftest import xla_flags
from tests.test_evaluate import random_inception  # noqa: F401 (a fixture)

# pytest-xdist runs the tests that share the digits demo on one worker.
pytestmark = pytest.mark.xdist_group("digits_fm")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sample_eval_export_read_neither_the_optimizer_state_nor_a_config(
    digits_fm_run, random_inception, tmp_path):  # noqa: F811
  config, workdir = digits_fm_run
  shutil.copytree(os.path.join(workdir, "checkpoints"), tmp_path / "checkpoints")
  steps = sorted(os.listdir(tmp_path / "checkpoints"), key=int)
  for step in steps:
    shutil.rmtree(tmp_path / "checkpoints" / step / "opt_state")
  # Training does need what was deleted: the full train state no longer restores, and the
  # refusal names the step and the missing item.
  setup = train_state.setup(config)
  mngr = checkpoint.manager(str(tmp_path), config.checkpoint)
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"checkpoint step {steps[-1]} does not restore: .*/{steps[-1]}/"
                           r"opt_state is missing"):
    checkpoint.restore(mngr, setup.abstract_state, step=int(steps[-1]))
  mngr.close()

  env = dict(os.environ, XLA_FLAGS=xla_flags(2))
  few = ["--config.sampling.num_steps=4"]
  for mode, overrides in [
      ("sample", few + ["--config.sampling.num_samples=8"]),
      ("export", []),
      ("eval", few + [f"--config.eval.inception_path={random_inception[2]}",
                      "--config.eval.num_samples=8", "--config.eval.batch_size=8",
                      "--config.eval.reference_num_examples=8"])]:
    result = subprocess.run([sys.executable, "main.py", f"--workdir={tmp_path}", f"--mode={mode}",
                             *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (mode, (result.stdout + result.stderr)[-3000:])
    assert "step 1500" in result.stdout, result.stdout
  assert os.path.isfile(tmp_path / "samples_step1500_heun_4steps_w2.npz")
  assert os.path.isfile(tmp_path / "export" / "step1500.safetensors")
  assert os.path.isfile(tmp_path / "eval_step1500_heun_4steps_w2_n8.json")
