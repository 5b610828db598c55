"""Euler–Maruyama on the reverse-time SDE (Song et al. 2021; docs/samplers.md).

Forward SDE of x_t = alpha·x + sigma·n (n ~ N(0, noise_std^2 I)): f = alpha_dot/alpha,
g^2 = -2·sigma^2·lambda_dot·noise_std^2. Reverse drift f·x - g^2·score with
score = -n_hat/(sigma·noise_std^2):
  x_s = x_t + (s - t)·(f·x_t - 2·sigma·lambda_dot·n_hat) + sqrt(t - s)·g·z,  z ~ N(0, I).
f and g are singular where alpha = 0: start at t_start < 1 there. N NFE. First order (weak);
the last step lands on t_end without a model call there.
"""
from typing import NamedTuple

import numpy as np

from kdiff_jax.samplers import core


class Step(NamedTuple):
  """Euler–Maruyama's step t -> s."""

  t: float
  dt: float           # s - t (negative)
  f: float            # alpha_dot_t/alpha_t
  sigma: float        # sigma_t
  lambda_dot: float   # d lambda/dt at t
  sqrt_dt_g: float    # sqrt(t - s)·g(t)·noise_std


def _euler_maruyama_step(carry, c, key, denoise):
  """x_s = x_t + (s - t)·(f·x_t - 2·sigma·lambda_dot·n_hat) + sqrt(t - s)·g·z."""
  x = carry["x"]
  _, n_hat = denoise(x, c.t)
  drift = c.f * x - 2.0 * c.sigma * c.lambda_dot * n_hat
  return {**carry, "x": x + c.dt * drift + core.gaussian(key, x, c.sqrt_dt_g)}


def euler_maruyama(ctx):
  ctx.require_alpha_positive("needs f = alpha_dot/alpha and g^2 = -2 sigma^2 lambda_dot")
  steps = []
  for t, s in zip(ctx.times[:-1], ctx.times[1:]):
    dt = float(s - t)
    sigma = float(ctx.sigma(t))
    lambda_dot = float(ctx.schedule.lambda_dot(np.float64(t)))
    g = ctx.noise_std * sigma * np.sqrt(max(-2.0 * lambda_dot, 0.0))
    step = Step(t=t, dt=dt, f=float(ctx.alpha_dot(t)) / float(ctx.alpha(t)), sigma=sigma,
                lambda_dot=lambda_dot, sqrt_dt_g=np.sqrt(-dt) * g)
    steps.append((_euler_maruyama_step, step, True))
  return core.steps_to_plan(steps)


def nfe(num_steps, final_sigma_zero=True):
  return num_steps
