"""DDIM(eta) in x0 form (Song et al. 2021; specs/samplers.md).

x_s = alpha_s·x_hat + sqrt(sigma_s^2 - c^2)·n_hat + c·z,  c = eta·sigma_s·sqrt(1 - e^{-2h}),
h = lambda_s - lambda_t. Written against x_t and x_hat (n_hat = (x_t - alpha_t·x_hat)/sigma_t):
x_s = a·x_t + (alpha_s - a·alpha_t)·x_hat + c·z,  a = sqrt(sigma_s^2 - c^2)/sigma_t,
which for eta = 0 is x_s = (sigma_s/sigma_t)·x_t - alpha_s·expm1(-h)·x_hat, finite at alpha_t = 0
(h = inf) and at sigma_s = 0. z ~ N(0, noise_std^2 I). N NFE.
"""
import numpy as np

from kdiff_jax.samplers import core


def ddim_coefs(ctx, t, s, eta=0.0):
  alpha_t, sigma_t = float(ctx.alpha(t)), float(ctx.sigma(t))
  alpha_s, sigma_s = float(ctx.alpha(s)), float(ctx.sigma(s))
  h = float(ctx.lambda_(s) - ctx.lambda_(t))
  if eta == 0.0:
    return {"t": t, "a": sigma_s / sigma_t, "b": -alpha_s * np.expm1(-h), "c": 0.0}
  c = eta * sigma_s * np.sqrt(-np.expm1(-2.0 * h))
  if c > sigma_s * (1.0 + 1e-12):
    raise ValueError(f"sampling.options.eta={eta}: the DDIM noise c = {c} exceeds sigma_s = {sigma_s} "
                     f"on the step {t} -> {s}; use eta <= 1")
  a = np.sqrt(max(sigma_s**2 - c**2, 0.0)) / sigma_t
  return {"t": t, "a": a, "b": alpha_s - a * alpha_t, "c": 0.0, "d": c * ctx.noise_std}


def ddim(ctx, eta=0.0):
  """DDIM with noise level eta >= 0 (eta = 1: the ancestral DDPM posterior step)."""
  eta = float(eta)
  if eta < 0.0:
    raise ValueError(f"sampling.options.eta={eta}: must be >= 0")
  body = core.linear_step if eta == 0.0 else core.linear_noise_step
  times = ctx.times
  return core.steps_to_plan([(body, ddim_coefs(ctx, t, s, eta), eta > 0.0)
                             for t, s in zip(times[:-1], times[1:])])


def nfe(num_steps, final_sigma_zero=True):
  return num_steps
