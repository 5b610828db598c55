"""Euler–Maruyama on the reverse-time SDE (Song et al. 2021; specs/samplers.md).

Forward SDE of x_t = alpha·x + sigma·n (n ~ N(0, noise_std^2 I)): f = alpha_dot/alpha,
g^2 = -2·sigma^2·lambda_dot·noise_std^2. Reverse drift f·x - g^2·score with
score = -n_hat/(sigma·noise_std^2):
  x_s = x_t + (s - t)·(f·x_t - 2·sigma·lambda_dot·n_hat) + sqrt(t - s)·g·z,  z ~ N(0, I).
f and g are singular where alpha = 0: start at t_start < 1 there. N NFE. First order (weak);
the last step lands on t_end without a model call there.
"""
import numpy as np

from kdiff_jax.samplers import core


def euler_maruyama(ctx):
  ctx.require_alpha_positive("needs f = alpha_dot/alpha and g^2 = -2 sigma^2 lambda_dot")
  steps = []
  for t, s in zip(ctx.times[:-1], ctx.times[1:]):
    dt = float(s - t)
    alpha, sigma = float(ctx.alpha(t)), float(ctx.sigma(t))
    lambda_dot = float(ctx.schedule.lambda_dot(np.float64(t)))
    coefs = {"t": t, "a": 1.0 + dt * float(ctx.alpha_dot(t)) / alpha, "b": 0.0,
             "c": -2.0 * dt * sigma * lambda_dot,
             "d": np.sqrt(-dt) * ctx.noise_std * sigma * np.sqrt(max(-2.0 * lambda_dot, 0.0))}
    steps.append((core.linear_noise_step, coefs, True))
  return core.steps_to_plan(steps)


def nfe(num_steps, final_sigma_zero=True):
  return num_steps
