"""An iMF checkpoint written by the code at commit 0b8c8cd (tests/fixtures/imf_meanflow_0b8c8cd,
its config.py says how) restores, samples and exports with today's code: the samples equal what
that code drew (expected.npz), and the export's JSON describes the run as today's code does."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from kdiff_jax import checkpoint, parallel, sampling, state
from kdiff_jax.export import checkpoints

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "imf_meanflow_0b8c8cd")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A copy of the fixture (export writes into <workdir>/export)."""
  directory = str(tmp_path_factory.mktemp("imf_fixture"))
  shutil.copytree(os.path.join(FIXTURE, "checkpoints"), os.path.join(directory, "checkpoints"))
  return directory


def test_restores_and_samples_what_the_old_code_sampled(workdir):
  config = checkpoint.load_config(workdir)
  expected = np.load(os.path.join(FIXTURE, "expected.npz"))
  weights = state.Weights(config, parallel.make_mesh(config.mesh))
  params, step = weights.restore(workdir, use_ema=False)
  assert step == 2
  for num_steps, name in ((1, "one_step"), (2, "two_steps")):
    config.sampling.num_steps = num_steps
    sample = sampling.build(config, weights.objective.description, weights.model.apply)
    got = jax.jit(sample)(params, expected["noise"], expected["labels"], jax.random.key(0))
    np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
  assert np.max(np.abs(expected["one_step"] - expected["noise"])) > 0.1


def test_exports(workdir):
  config = checkpoint.load_config(workdir)
  paths = checkpoints.export_checkpoint(config, workdir)
  with open(paths["json"]) as f:
    meta = json.load(f)
  assert meta["model"]["name"] == "imf_dit" and meta["weights"]["step"] == 2
  assert meta["sampling"]["guidance_interval"] == [0.2, 0.8]
  assert meta["sampling"]["times"] == [1.0, 0.0]
