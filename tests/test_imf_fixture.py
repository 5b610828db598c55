"""An iMF checkpoint written by the code at commit 0b8c8cd (tests/fixtures/imf_meanflow_0b8c8cd,
its config.py says how), when iMF was objective.name = 'meanflow' with
objective.meanflow.variant = 'imf', restores, samples and exports with today's code: its config
reads as objective.name = 'imf', the samples equal what that code drew (expected.npz), and the
export samples the same in PyTorch."""
import os
import shutil

import jax
import numpy as np
import pytest

from kdiff_jax import checkpoint, config as config_lib, parallel, sampling, state
from kdiff_jax.export import checkpoints

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "imf_meanflow_0b8c8cd")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A copy of the fixture (export writes into <workdir>/export)."""
  directory = str(tmp_path_factory.mktemp("imf_fixture"))
  shutil.copytree(os.path.join(FIXTURE, "checkpoints"), os.path.join(directory, "checkpoints"))
  return directory


def test_the_old_config_reads_as_imf(workdir):
  config = checkpoint.load_config(workdir)
  config_lib.validate(config)
  assert config.objective.name == "imf" and "variant" not in config.objective.meanflow
  assert config.objective.imf.to_dict() == dict(
      share_r_equals_t=0.5, adaptive_p=1.0, adaptive_c=0.01, full_batch_jvp=False, s_max=7.0,
      cfg_beta=1.0, interval_split=0.5, aux_v_head=True)


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


def test_exports_and_samples_in_torch_what_the_old_code_sampled(workdir):
  torch = pytest.importorskip("torch")
  from kdiff_jax.export import torch_load, torch_sampling
  config = checkpoint.load_config(workdir)
  paths = checkpoints.export_checkpoint(config, workdir)
  model, meta = torch_load.load(paths["json"])
  assert meta["model"]["name"] == "imf_dit" and meta["weights"]["step"] == 2
  assert meta["objective"]["name"] == "imf" and meta["objective"]["torch_sampler"] == "imf"
  assert meta["sampling"]["guidance_interval"] == [0.2, 0.8]
  assert meta["sampling"]["times"] == [1.0, 0.0]
  expected = np.load(os.path.join(FIXTURE, "expected.npz"))
  nchw = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)
  got = torch_sampling.sample(model, meta, nchw(expected["noise"]),
                              torch.from_numpy(np.array(expected["labels"])))
  np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected["one_step"], rtol=1e-5,
                             atol=1e-5)


def test_an_old_meanflow_config_drops_the_variant_fields():
  """A MeanFlow run saved by that code (objective.meanflow.variant = 'meanflow', and the unused
  objective.meanflow.imf.*) reads as today's MeanFlow config, its fields unchanged."""
  import json as json_lib
  from configs import meanflow_digits
  from kdiff_jax import schema
  saved = json_lib.loads(meanflow_digits.get_config().to_json())
  saved["objective"]["meanflow"].update(variant="meanflow", imf=dict(s_max=7.0, cfg_beta=1.0))
  config = schema.from_dict(saved)
  config_lib.validate(config)
  assert config.objective.name == "meanflow"
  today = meanflow_digits.get_config().objective.meanflow
  assert config.objective.meanflow.to_dict() == today.to_dict()
