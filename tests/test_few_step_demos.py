"""The few-step demos' commands work end to end: `python main.py --config=configs/<demo>.py
--workdir=W` trains, checkpoints and writes its sample grid, then `--mode=sample` with no
--config reads the run's own config and samples at another number of steps.

Shortened to 4 training steps (the objective and sampler code is the demo's; its tests are
test_meanflow.py, test_imf.py, test_pmf.py and test_tvm.py). How well the full demos sample (conditional
accuracy at 1, 2 and 4 steps, 1500 training steps each) is benchmarks/few_step.py's table.
"""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, xla_flags

SHORT = ["--config.training.num_steps=4", "--config.training.batch_size=16",
         "--config.training.sample_every=4", "--config.training.checkpoint_every=4",
         "--config.training.log_every=2", "--config.sampling.grid_size=2"]


def main(*args):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  result = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  return result.stdout


@pytest.mark.parametrize("demo, method", [("meanflow_digits", "mean_flow"),
                                          ("imf_digits", "mean_flow"), ("pmf_digits", "mean_flow"),
                                          ("tvm_digits", "tvm")])
def test_demo_trains_writes_its_grid_and_samples_with_no_config(demo, method, tmp_path):
  main(f"--config=configs/{demo}.py", f"--workdir={tmp_path}", *SHORT)
  assert os.path.isdir(tmp_path / "checkpoints" / "4")
  assert glob.glob(str(tmp_path / "samples" / "step_*4*.png"))
  out = main(f"--workdir={tmp_path}", "--mode=sample", "--config.sampling.num_steps=2",
             "--config.sampling.num_samples=4")
  assert "step 4" in out, out
  (path,) = glob.glob(str(tmp_path / f"samples_step4_{method}_2steps*.npz"))
  with np.load(path) as samples:
    images = next(iter(samples.values()))
  assert images.shape[0] == 4 and np.all(np.isfinite(images)), images.shape
