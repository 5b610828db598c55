"""Schedules against closed forms and finite differences, in float64 on the host."""
import jax.numpy as jnp
import numpy as np
import pytest

from kdiff_jax import schedules

ALL = [schedules.RectifiedFlow(), schedules.Cosine(), schedules.VP()]
T = np.linspace(0.013, 0.987, 41)


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.name)
def test_derivatives_match_finite_differences(schedule):
  h = 1e-7
  # Stay off the VP knots (every 1/1000) where its interpolant has a kink.
  t = T + 3.3e-4
  for value, derivative in ((schedule.alpha, schedule.alpha_dot), (schedule.sigma, schedule.sigma_dot)):
    numeric = (value(t + h) - value(t - h)) / (2 * h)
    np.testing.assert_allclose(derivative(t), numeric, rtol=1e-5, atol=1e-7)
  numeric = (schedule.lambda_(t + h) - schedule.lambda_(t - h)) / (2 * h)
  np.testing.assert_allclose(schedule.lambda_dot(t), numeric, rtol=1e-5)


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.name)
def test_eta_inverse_and_endpoints(schedule):
  np.testing.assert_allclose(schedule.eta_inv(schedule.eta(T)), T, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(schedule.lambda_inv(schedule.lambda_(T)), T, rtol=1e-9, atol=1e-12)
  assert schedule.alpha(0.0) == pytest.approx(1.0) and schedule.sigma(0.0) == pytest.approx(0.0)
  assert np.all(np.diff(schedule.eta(T)) > 0)


def test_closed_forms():
  rf, cos = schedules.RectifiedFlow(), schedules.Cosine()
  np.testing.assert_allclose(rf.eta(T), T / (1 - T))
  np.testing.assert_allclose(cos.alpha(T) ** 2 + cos.sigma(T) ** 2, 1.0)
  np.testing.assert_allclose(cos.eta(T), np.tan(np.pi * T / 2))


def test_vp_matches_ddpm_table_at_the_knots():
  vp = schedules.VP()
  betas = np.linspace(1e-4, 0.02, 1000)
  alphabar = np.cumprod(1.0 - betas)
  i = np.array([1, 10, 250, 500, 999, 1000])
  np.testing.assert_allclose(vp.alpha(i / 1000.0) ** 2, alphabar[i - 1], rtol=1e-10)
  np.testing.assert_allclose(vp.alpha(T) ** 2 + vp.sigma(T) ** 2, 1.0, rtol=1e-12)


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.name)
def test_jax_float32_agrees_with_numpy_float64(schedule):
  t32 = jnp.asarray(T, jnp.float32)
  for fn in ("alpha", "sigma", "alpha_dot", "sigma_dot", "eta"):
    out = getattr(schedule, fn)(t32)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), getattr(schedule, fn)(T), rtol=2e-5, atol=1e-6)


def test_unknown_schedule_names_the_field():
  with pytest.raises(ValueError, match=r"objective.schedule='edm'.*rectified_flow"):
    schedules.get("edm")
