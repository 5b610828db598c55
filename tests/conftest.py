"""Test setup: 8 simulated CPU devices, float32 matmuls, quiet TensorFlow.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_default_matmul_precision", "float32")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_fm_run(tmp_path_factory):
  """The README demo (configs/digits_fm.py), trained once per test session: (config, workdir)."""
  from configs import digits_fm
  from kdiff_jax import train
  workdir = str(tmp_path_factory.mktemp("digits_fm"))
  config = digits_fm.get_config()
  train.train_and_evaluate(config, workdir)
  return config, workdir
