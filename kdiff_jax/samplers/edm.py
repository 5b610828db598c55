"""EDM's Heun sampler with churn (Karras et al. 2022, Algorithm 2; Algorithm 1 when S_churn = 0)
for a general interpolant.

In x_bar = x/alpha and sigma_bar = eta = sigma/alpha the probability-flow ODE is EDM's
d x_bar / d sigma_bar = (x_bar - D(x_bar; sigma_bar))/sigma_bar = n_hat. With x_bar = x/alpha
every line of Algorithm 2 becomes a step in x:

  line 5   gamma_i = min(S_churn/N, sqrt(2) - 1) if S_tmin <= sigma_bar_i <= S_tmax, else 0
  line 6   sigma_hat = (1 + gamma_i)·sigma_bar_i, at the time t_hat = eta^{-1}(sigma_hat)
  line 7   x_hat = (alpha_hat/alpha_i)·x_i + alpha_hat·sqrt(sigma_hat^2 - sigma_bar_i^2)·S_noise·z,
           z ~ N(0, noise_std^2 I)
  line 8   d_i = n_hat(x_hat, t_hat)
  line 9   x_{i+1} = (alpha_{i+1}/alpha_hat)·x_hat + alpha_{i+1}·(sigma_bar_{i+1} - sigma_hat)·d_i
  line 10-12  unless sigma_{i+1} = 0: d'_i = n_hat(x_{i+1}, t_{i+1}) and the same step with
           (d_i + d'_i)/2.

`edm_heun` plans the float64 coefficients of lines 5-6 and the step on the host; `_edm_heun_step`
is lines 7-12. 2N - 1 NFE (2N when t_end has sigma > 0). Use grid='karras' for EDM's schedule.
"""
import functools
from typing import NamedTuple

import numpy as np

from kdiff_jax.samplers import core


class Step(NamedTuple):
  """Algorithm 2's step i in float64."""

  t: float                # t_hat: the time of sigma_hat (t_i without churn)
  s: float                # t_{i+1}
  alpha_hat_ratio: float  # alpha_hat/alpha_i (1 without churn)
  churn_noise: float      # alpha_hat·sqrt(sigma_hat^2 - sigma_bar_i^2)·S_noise·noise_std (0 without)
  alpha_ratio: float      # alpha_{i+1}/alpha_hat
  alpha_delta_eta: float  # alpha_{i+1}·(sigma_bar_{i+1} - sigma_hat)


def _edm_heun_step(carry, c, key, denoise, *, churn: bool, second_order: bool):
  """Lines 7-12 of Algorithm 2 (module docstring), x = alpha·x_bar throughout."""
  x = carry["x"]
  if churn:                                   # line 7: add noise, sigma_bar_i -> sigma_hat
    x = c.alpha_hat_ratio * x + core.gaussian(key, x, c.churn_noise)
  _, d = denoise(x, c.t)                      # line 8: d_i at (x_hat, t_hat)
  x_next = c.alpha_ratio * x + c.alpha_delta_eta * d   # line 9: Euler step to t_{i+1}
  if second_order:                            # lines 10-12: the trapezoid correction
    _, d_prime = denoise(x_next, c.s)
    x_next = c.alpha_ratio * x + c.alpha_delta_eta * (0.5 * (d + d_prime))
  return {**carry, "x": x_next}


# (churn, second_order) -> the step body (one object each, so equal steps share a scan).
_BODIES = {(churn, second_order): functools.partial(_edm_heun_step, churn=churn,
                                                     second_order=second_order)
           for churn in (False, True) for second_order in (False, True)}


def edm_heun(ctx, S_churn=0.0, S_tmin=0.0, S_tmax=float("inf"), S_noise=1.0):
  """Algorithm 2 on ctx.times; lines 5-6 and the step's coefficients in float64."""
  ctx.require_alpha_positive("steps in x_bar = x/alpha")
  if S_churn < 0:
    raise ValueError(f"sampling.options.S_churn={S_churn}: must be >= 0")
  churn = S_churn > 0
  steps = []
  for t_i, t_next in zip(ctx.times[:-1], ctx.times[1:]):
    t_hat, alpha_hat_ratio, churn_noise = t_i, 1.0, 0.0
    if churn:
      sigma_bar = float(ctx.eta(t_i))
      gamma = min(S_churn / ctx.num_steps, np.sqrt(2.0) - 1.0) if S_tmin <= sigma_bar <= S_tmax else 0.0
      t_hat = float(ctx.schedule.eta_inv(np.float64(sigma_bar * (1.0 + gamma)))) if gamma > 0 else float(t_i)
      t_hat = max(t_hat, float(t_i))
      sigma_hat = float(ctx.eta(t_hat))
      alpha_hat = float(ctx.alpha(t_hat))
      alpha_hat_ratio = alpha_hat / float(ctx.alpha(t_i))
      churn_noise = alpha_hat * np.sqrt(max(sigma_hat**2 - sigma_bar**2, 0.0)) * S_noise * ctx.noise_std
    phi = ctx.phi(t_hat, t_next)   # (alpha_{i+1}/alpha_hat, alpha_{i+1}·(sigma_bar_{i+1} - sigma_hat))
    step = Step(t=t_hat, s=t_next, alpha_hat_ratio=alpha_hat_ratio, churn_noise=churn_noise,
                alpha_ratio=phi.alpha_ratio, alpha_delta_eta=phi.alpha_delta_eta)
    steps.append((_BODIES[churn, not ctx.to_zero(t_next)], step, churn))
  return core.steps_to_plan(steps)


def nfe(num_steps, final_sigma_zero=True):
  return 2 * num_steps - (1 if final_sigma_zero else 0)
