"""Flow Euler and Heun in t on the probability-flow velocity (docs/samplers.md).

dx/dt = v(x_t, t) = alpha_dot_t·x_hat + sigma_dot_t·n_hat
Euler: x_s = x_t + (s - t)·v(x_t, t). Heun: the trapezoid correction with v at the Euler point;
the last step is Euler (never a model call at t_end). For rectified flow Euler is exactly DDIM.
"""
from typing import NamedTuple

from kdiff_jax.samplers import core


class EulerStep(NamedTuple):
  """The step t -> s of Euler (and Heun's last one)."""

  t: float            # the time of the model call
  dt: float           # s - t (negative)
  alpha_dot_t: float
  sigma_dot_t: float


class HeunStep(NamedTuple):
  """Heun's step t -> s: the derivatives at both ends."""

  t: float
  s: float            # where the correction calls the model again
  dt: float           # s - t
  alpha_dot_t: float
  sigma_dot_t: float
  alpha_dot_s: float
  sigma_dot_s: float


def _euler_step(carry, c, key, denoise):
  """x_s = x_t + (s - t)·(alpha_dot_t·x_hat + sigma_dot_t·n_hat)."""
  x = carry["x"]
  x_hat, n_hat = denoise(x, c.t)
  return {**carry, "x": x + c.dt * (c.alpha_dot_t * x_hat + c.sigma_dot_t * n_hat)}


def _heun_step(carry, c, key, denoise):
  """x' = x + dt·v(x, t);  x_s = x + dt·(v(x, t) + v(x', s))/2  (Heun 1900; EDM Alg. 1 in t)."""
  x = carry["x"]
  x_hat, n_hat = denoise(x, c.t)
  v_t = c.alpha_dot_t * x_hat + c.sigma_dot_t * n_hat
  x_euler = x + c.dt * v_t
  x_hat, n_hat = denoise(x_euler, c.s)
  v_s = c.alpha_dot_s * x_hat + c.sigma_dot_s * n_hat
  return {**carry, "x": x + c.dt * (0.5 * (v_t + v_s))}


def _euler_coefs(ctx, t, s) -> EulerStep:
  return EulerStep(t=t, dt=s - t, alpha_dot_t=float(ctx.alpha_dot(t)),
                   sigma_dot_t=float(ctx.sigma_dot(t)))


def _heun_coefs(ctx, t, s) -> HeunStep:
  return HeunStep(t=t, s=s, dt=s - t, alpha_dot_t=float(ctx.alpha_dot(t)),
                  sigma_dot_t=float(ctx.sigma_dot(t)), alpha_dot_s=float(ctx.alpha_dot(s)),
                  sigma_dot_s=float(ctx.sigma_dot(s)))


def euler(ctx):
  """x_s = x_t + (s - t)·v(x_t, t).  N NFE."""
  times = ctx.times
  return core.steps_to_plan([(_euler_step, _euler_coefs(ctx, t, s), False)
                             for t, s in zip(times[:-1], times[1:])])


def heun(ctx):
  """Heun steps, the last one Euler.  2N - 1 NFE."""
  times, steps = ctx.times, []
  for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
    if i == ctx.num_steps - 1:
      steps.append((_euler_step, _euler_coefs(ctx, t, s), False))
    else:
      steps.append((_heun_step, _heun_coefs(ctx, t, s), False))
  return core.steps_to_plan(steps)


def euler_nfe(num_steps, final_sigma_zero=True):
  return num_steps


def heun_nfe(num_steps, final_sigma_zero=True):
  return 2 * num_steps - 1
