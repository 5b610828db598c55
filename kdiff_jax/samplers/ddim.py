"""DDIM(eta) (Song et al. 2021, Eq. 12; docs/samplers.md).

x_s = alpha_s·x_hat + sqrt(sigma_s^2 - c^2)·n_hat + c·z,   c = eta·sigma_s·sqrt(1 - e^{-2h}),
h = lambda_s - lambda_t, z ~ N(0, noise_std^2 I). eta = 0 is deterministic; eta = 1 is the
ancestral DDPM posterior step. x_hat and n_hat come from parameterization.to_x_eps, so the step
is finite at alpha_t = 0 (for x / v / velocity models) and at sigma_s = 0. N NFE.
"""
from typing import NamedTuple

import numpy as np

from kdiff_jax.samplers import core


class Step(NamedTuple):
  """DDIM's step t -> s."""

  t: float             # the time of the model call
  alpha_s: float
  sigma_s_kept: float  # sqrt(sigma_s^2 - c^2): the part of sigma_s the step keeps deterministic
  c_noise: float       # c·noise_std, the fresh noise's scale (0 when eta = 0)


def _ddim_step(carry, c, key, denoise):
  """x_s = alpha_s·x_hat + sigma_s'·n_hat,  sigma_s' = sqrt(sigma_s^2 - c^2)."""
  x_hat, n_hat = denoise(carry["x"], c.t)
  return {**carry, "x": c.alpha_s * x_hat + c.sigma_s_kept * n_hat}


def _ddim_noise_step(carry, c, key, denoise):
  """x_s = alpha_s·x_hat + sqrt(sigma_s^2 - c^2)·n_hat + c·z."""
  x = _ddim_step(carry, c, key, denoise)["x"]
  return {**carry, "x": x + core.gaussian(key, x, c.c_noise)}


def ddim_coefs(ctx, t, s, eta=0.0) -> Step:
  """The step's record in float64: c = eta·sigma_s·sqrt(1 - e^{-2h}), h = lambda_s - lambda_t."""
  alpha_s, sigma_s = float(ctx.alpha(s)), float(ctx.sigma(s))
  if eta == 0.0:
    return Step(t=t, alpha_s=alpha_s, sigma_s_kept=sigma_s, c_noise=0.0)
  h = float(ctx.lambda_(s) - ctx.lambda_(t))
  c = eta * sigma_s * np.sqrt(-np.expm1(-2.0 * h))
  if c > sigma_s * (1.0 + 1e-12):
    raise ValueError(f"sampling.options.eta={eta}: the DDIM noise c = {c} exceeds sigma_s = {sigma_s} "
                     f"on the step {t} -> {s}; use eta <= 1")
  return Step(t=t, alpha_s=alpha_s, sigma_s_kept=np.sqrt(max(sigma_s**2 - c**2, 0.0)),
              c_noise=c * ctx.noise_std)


def ddim(ctx, eta=0.0):
  """DDIM with noise level eta >= 0 (eta = 1: the ancestral DDPM posterior step)."""
  eta = float(eta)
  if eta < 0.0:
    raise ValueError(f"sampling.options.eta={eta}: must be >= 0")
  body = _ddim_step if eta == 0.0 else _ddim_noise_step
  times = ctx.times
  return core.steps_to_plan([(body, ddim_coefs(ctx, t, s, eta), eta > 0.0)
                             for t, s in zip(times[:-1], times[1:])])


def nfe(num_steps, final_sigma_zero=True):
  return num_steps
