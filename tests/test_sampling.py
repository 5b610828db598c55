"""The sampling assembly (kdiff_jax/sampling.py): one namespace for every objective, a method that
does not fit the objective rejected at start with the field and the allowed values."""
import pytest

from configs import default, imm_digits
from kdiff_jax import config as config_lib, objectives, samplers


@pytest.mark.parametrize("make, method, message", [
    (imm_digits.get_config, "heun",
     r"sampling.method='heun': objective.name='imm' samples with one of \['pushforward', 'restart'\]"),
    (default.get_config, "pushforward",
     r"sampling.method='pushforward': objective.name='flow' samples with one of \['euler', 'heun', 'ddim'"),
    (default.get_config, "nope",
     r"sampling.method='nope': objective.name='flow' samples with one of \['euler'"),
], ids=["imm-heun", "flow-pushforward", "unknown"])
def test_a_method_outside_the_objectives_family_is_rejected(make, method, message):
  config = make()
  config_lib.validate(config)   # as configured it is valid
  config.sampling.method = method
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_each_objective_gets_its_family():
  assert objectives.describe(imm_digits.get_config()).methods == ("pushforward", "restart")
  for name in ("flow", "kdiff"):
    config = default.get_config()
    config.objective.name = name
    assert objectives.describe(config).methods == samplers.METHODS


def test_plans_that_cannot_run_fail_at_start():
  imm = imm_digits.get_config()
  imm.sampling.grid = "cifar"   # the CIFAR grids have 1 and 2 steps; imm_digits samples with 4
  with pytest.raises(ValueError, match="1- and 2-step"):
    config_lib.validate(imm)
  flow = default.get_config()
  flow.objective.prediction = "eps"   # no x_hat where alpha = 0: rectified flow at t = 1
  with pytest.raises(ValueError, match=r"prediction='eps' gives no x_hat.*t_start < 1"):
    config_lib.validate(flow)
  flow.sampling.t_start = 0.999
  config_lib.validate(flow)
  flow.sampling.options.rho = 5.0   # read by the karras grid only
  with pytest.raises(ValueError, match=r"sampling.options.rho=5.0 has no effect"):
    config_lib.validate(flow)
