"""Every conversion is an exact inverse; the k-Diff special cases are the eps/v/x closed forms."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdiff_jax import parameterization as param
from kdiff_jax import schedules

ALL = [schedules.RectifiedFlow(), schedules.Cosine(), schedules.VP()]
SHAPES = [(5, 2), (3, 4, 4, 3), (2, 8, 8, 1)]


def _draw(seed, shape):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k1, shape)
  n = jax.random.normal(k2, shape)
  t = jax.random.uniform(k3, shape[:1], minval=0.05, maxval=0.95)
  k = jax.random.uniform(k4, (), minval=0.05, maxval=0.95)
  return x, n, t, k


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_pair_of_conversions_round_trips(schedule, shape):
  x, n, t, k = _draw(hash((schedule.name, shape)) % 1000, shape)
  x_t = param.interpolate(x, n, t, schedule)
  for source, target in itertools.permutations(param.PREDICTIONS, 2):
    out = param.from_x_eps(source, x, n, t, schedule, k=k)
    there = param.convert(out, x_t, t, schedule, source=source, target=target, k=k)
    np.testing.assert_allclose(there, param.from_x_eps(target, x, n, t, schedule, k=k),
                               rtol=2e-4, atol=2e-4, err_msg=f"{source}->{target}")
    back = param.convert(there, x_t, t, schedule, source=target, target=source, k=k)
    np.testing.assert_allclose(back, out, rtol=2e-4, atol=2e-4, err_msg=f"{source}->{target}->{source}")


def test_noise_std_enters_the_score():
  schedule = schedules.RectifiedFlow()
  x, n, t, _ = _draw(1, (6, 3))
  n = 0.5 * n
  x_t = param.interpolate(x, n, t, schedule)
  score = param.from_x_eps("score", x, n, t, schedule, noise_std=0.5)
  # For a point mass at x the true score of N(alpha x, sigma^2 s^2) is -(x_t - alpha x)/(sigma^2 s^2).
  tb = t[:, None]
  np.testing.assert_allclose(score, -(x_t - (1 - tb) * x) / (tb**2 * 0.25), rtol=1e-4)
  x_hat, n_hat = param.to_x_eps("score", score, x_t, t, schedule, noise_std=0.5)
  np.testing.assert_allclose(x_hat, x, atol=1e-4)


def test_rectified_flow_closed_forms():
  schedule = schedules.RectifiedFlow()
  x, n, t, _ = _draw(2, (7, 3))
  x_t = param.interpolate(x, n, t, schedule)
  u = param.from_x_eps("velocity", x, n, t, schedule)
  np.testing.assert_allclose(u, n - x, atol=1e-6)
  x_hat, n_hat = param.to_x_eps("velocity", u, x_t, t, schedule)
  tb = t[:, None]
  np.testing.assert_allclose(x_hat, x_t - tb * u, atol=1e-5)
  np.testing.assert_allclose(n_hat, x_t + (1 - tb) * u, atol=1e-5)


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.name)
def test_kdiff_special_cases(schedule):
  x, n, t, _ = _draw(3, (4, 5))
  # k = 1 is x-prediction, k = 0 is minus eps-prediction.
  np.testing.assert_allclose(param.from_x_eps("u_k", x, n, t, schedule, k=1.0), x)
  np.testing.assert_allclose(param.from_x_eps("u_k", x, n, t, schedule, k=0.0), -n)
  # k = 1/2 on rectified flow is -v/2 with v the flow velocity n - x.
  if schedule.name == "rectified_flow":
    np.testing.assert_allclose(param.from_x_eps("u_k", x, n, t, schedule, k=0.5),
                               -0.5 * (n - x), atol=1e-6)
  x_t = param.interpolate(x, n, t, schedule)
  for k, source in ((1.0, "x"), (0.0, "eps")):
    sign = 1.0 if k else -1.0
    out = param.from_x_eps(source, x, n, t, schedule)
    want = param.to_x_eps(source, out, x_t, t, schedule)
    got = param.to_x_eps("u_k", sign * out, x_t, t, schedule, k=k)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)


def test_kdiff_velocity_formula_of_the_spec():
  """Rectified flow: v_hat = n_hat - x_hat = ((2k - 1)·x_t - u)/Delta, Delta = k·t + (1-k)(1-t)."""
  schedule = schedules.RectifiedFlow()
  x, n, t, k = _draw(4, (6, 3))
  x_t = param.interpolate(x, n, t, schedule)
  u_hat = jax.random.normal(jax.random.key(9), x.shape)
  x_hat, n_hat = param.to_x_eps("u_k", u_hat, x_t, t, schedule, k=k)
  tb = t[:, None]
  delta = k * tb + (1 - k) * (1 - tb)
  np.testing.assert_allclose(n_hat - x_hat, ((2 * k - 1) * x_t - u_hat) / delta, rtol=1e-4, atol=1e-5)


def test_min_divisor_clamps_near_the_endpoint():
  schedule = schedules.RectifiedFlow()
  x_t = jnp.ones((2, 3))
  t = jnp.array([1e-4, 0.5])
  _, n_hat = param.to_x_eps("x", jnp.zeros((2, 3)), x_t, t, schedule, min_divisor=0.05)
  np.testing.assert_allclose(n_hat[:, 0], [1 / 0.05, 1 / 0.5], rtol=1e-6)


def test_per_example_k_broadcasts():
  schedule = schedules.Cosine()
  x, n, t, _ = _draw(5, (3, 2, 2, 1))
  k = jnp.array([0.2, 0.5, 0.9])
  out = param.from_x_eps("u_k", x, n, t, schedule, k=k)
  np.testing.assert_allclose(out[1], 0.5 * x[1] - 0.5 * n[1], atol=1e-6)


def test_bad_prediction_names_allowed_values():
  with pytest.raises(ValueError, match=r"prediction='noise'.*'eps'"):
    param.to_x_eps("noise", 0.0, 0.0, 0.5, schedules.RectifiedFlow())
  with pytest.raises(ValueError, match="needs k"):
    param.from_x_eps("u_k", 1.0, 1.0, 0.5, schedules.RectifiedFlow())
