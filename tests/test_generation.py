"""main.py --mode=sample on the demo checkpoint, with several samplers."""
import os
import subprocess
import sys

import numpy as np
import pytest

from kdiff_jax import generation
from tests.conftest import xla_flags
from tests.test_demo import digit_classifier

# pytest-xdist runs the tests that share the digits demo on one worker.
pytestmark = pytest.mark.xdist_group("digits_fm")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_sample_mode_writes_npz_and_png(digits_fm_run):
  _, workdir = digits_fm_run
  env = dict(os.environ, XLA_FLAGS=xla_flags(2))
  subprocess.run(
      [sys.executable, "main.py", "--config=configs/digits_fm.py", f"--workdir={workdir}",
       "--mode=sample", "--config.sampling.method=ddim", "--config.sampling.num_steps=10",
       "--config.sampling.num_samples=30", "--config.sampling.classes=(3,7)"],
      cwd=ROOT, env=env, check=True, timeout=300)
  npz = os.path.join(workdir, "samples_step1500_ddim_10steps_w2.npz")
  with np.load(npz) as f:
    assert f["images"].shape == (30, 8, 8, 1) and f["uint8"].dtype == np.uint8
    np.testing.assert_array_equal(f["labels"], [3, 7] * 15)
  assert os.path.exists(npz[:-4] + ".png")


# PNDM's transfer divides by alpha, so it starts just below t = 1 on rectified flow.
@pytest.mark.parametrize("method, num_steps, t_start", [
    ("f_pndm", 10, 0.999), ("dpm_solver_2m", 20, 1.0), ("heun", 25, 1.0)])
def test_samplers_draw_the_conditioned_digits(digits_fm_run, method, num_steps, t_start):
  config, workdir = digits_fm_run
  config = config.copy_and_resolve_references()
  config.sampling.method, config.sampling.num_steps = method, num_steps
  config.sampling.t_start = t_start
  config.sampling.num_samples = 200
  with np.load(generation.generate(config, workdir)) as f:
    x, labels = f["images"], f["labels"]
  accuracy = np.mean(digit_classifier().predict(x.reshape(len(x), -1)) == labels)
  print(f"{method} {num_steps} steps: accuracy {accuracy:.3f}")
  assert accuracy >= 0.8


def test_missing_checkpoint_names_the_workdir(tmp_path, digits_fm_run):
  config, _ = digits_fm_run
  with pytest.raises(FileNotFoundError, match="--workdir="):
    generation.generate(config, str(tmp_path))
