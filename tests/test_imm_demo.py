"""The IMM digits demo (configs/imm_digits.py) trains on CPU and its few-step samples are the right digits.

The classifier of test_demo.py (logistic regression on the real digits, never on samples)
labels 500 class-conditional samples; with 4-step pushforward sampling (the config's) at least 80%
must carry the class they were conditioned on. The accuracy at 1, 2 and 4 steps, next to the other
few-step methods', is benchmarks/few_step.py's table.
"""
import pytest

from configs import imm_digits
from tests.conftest import once_per_run, train_demo
from tests.test_demo import conditional_accuracy

# pytest-xdist runs the tests that share this module's fixtures on one worker.
pytestmark = pytest.mark.xdist_group("imm_demo")


@pytest.fixture(scope="session")
def imm_digits_run(tmp_path_factory):
  directory = once_per_run(tmp_path_factory, "imm_digits", lambda d: train_demo("imm_digits", d))
  return imm_digits.get_config(), directory


def test_imm_digits_samples_are_the_conditioned_digits(imm_digits_run):
  config, workdir = imm_digits_run
  assert config.sampling.num_steps == 4
  accuracy = conditional_accuracy(config, workdir)
  print(f"imm_digits conditional accuracy at 4 steps: {accuracy:.3f}")
  assert accuracy >= 0.8
