"""EDM's Heun sampler with churn (Karras et al. 2022, Algorithm 2; Algorithm 1 when S_churn = 0)
for a general interpolant: `edm_heun`, one function that reads as the algorithm.

EDM samples x_bar = x/alpha at noise level sigma_bar = eta = sigma/alpha (Algorithm 1's
s(t) = alpha, sigma(t) = eta), where the probability-flow ODE is
d x_bar / d sigma_bar = (x_bar - D(x_bar; sigma_bar))/sigma_bar = n_hat. Every line of
Algorithm 2 is carried to x = alpha·x_bar; a step from sigma_bar to sigma_bar' is then PNDM's
transfer phi(x, d, t, t') = (alpha'/alpha)·x + alpha'·(sigma_bar' - sigma_bar)·d (core.Transfer).
Lines 3-5 plan each step in float64 on the host (gamma_i, t_hat, the churn's scales); lines 6-11
are the step that lax.scan runs. 2N - 1 NFE (2N when t_end has sigma > 0). Use grid='karras' for
EDM's schedule.
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
  phi: core.Transfer      # phi(., ., t_hat, t_{i+1})


def edm_heun(ctx, S_churn=0.0, S_tmin=0.0, S_tmax=float("inf"), S_noise=1.0):
  """Algorithm 2 on ctx.times, in x = alpha·x_bar:

    3   for i in 0 .. N-1:  gamma_i = min(S_churn/N, sqrt(2) - 1) if S_tmin <= sigma_bar_i <= S_tmax
    4     eps_i ~ N(0, S_noise^2 noise_std^2 I)
    5     sigma_hat = (1 + gamma_i)·sigma_bar_i, at the time t_hat = eta^{-1}(sigma_hat)
    6     x_hat = (alpha_hat/alpha_i)·x_i + alpha_hat·sqrt(sigma_hat^2 - sigma_bar_i^2)·eps_i
    7     d_i = n_hat(x_hat, t_hat)
    8     x_{i+1} = phi(x_hat, d_i, t_hat, t_{i+1})
    9     if sigma_{i+1} != 0:
    10      d'_i = n_hat(x_{i+1}, t_{i+1})
    11      x_{i+1} = phi(x_hat, (d_i + d'_i)/2, t_hat, t_{i+1})
  """
  ctx.require_alpha_positive("steps in x_bar = x/alpha")
  if S_churn < 0:
    raise ValueError(f"sampling.options.S_churn={S_churn}: must be >= 0")
  churn = S_churn > 0

  def step(carry, c, key, denoise, *, second_order):
    """Lines 4 and 6-11 on the device (c: the step's record)."""
    x_i = carry["x"]
    x_hat = (c.alpha_hat_ratio * x_i + core.gaussian(key, x_i, c.churn_noise)  # lines 4 and 6
             if churn else x_i)
    _, d_i = denoise(x_hat, c.t)                    # line 7
    x_next = c.phi(x_hat, d_i)                      # line 8
    if second_order:                                # line 9
      _, d_prime = denoise(x_next, c.s)             # line 10
      x_next = c.phi(x_hat, 0.5 * (d_i + d_prime))  # line 11
    return {**carry, "x": x_next}

  bodies = {second_order: functools.partial(step, second_order=second_order)
            for second_order in (False, True)}  # one object each: equal steps share a scan
  steps = []
  for t_i, t_next in zip(ctx.times[:-1], ctx.times[1:]):  # line 3; line 5 and line 6's scales
    t_hat, alpha_hat_ratio, churn_noise = t_i, 1.0, 0.0
    if churn:
      sigma_bar = float(ctx.eta(t_i))
      gamma = (min(S_churn / ctx.num_steps, np.sqrt(2.0) - 1.0)
               if S_tmin <= sigma_bar <= S_tmax else 0.0)
      t_hat = float(t_i)
      if gamma > 0:
        t_hat = max(float(ctx.schedule.eta_inv(np.float64(sigma_bar * (1.0 + gamma)))), t_hat)
      sigma_hat = float(ctx.eta(t_hat))
      alpha_hat = float(ctx.alpha(t_hat))
      alpha_hat_ratio = alpha_hat / float(ctx.alpha(t_i))
      churn_noise = (alpha_hat * np.sqrt(max(sigma_hat**2 - sigma_bar**2, 0.0)) * S_noise
                     * ctx.noise_std)
    record = Step(t=t_hat, s=t_next, alpha_hat_ratio=alpha_hat_ratio, churn_noise=churn_noise,
                  phi=ctx.phi(t_hat, t_next))
    steps.append((bodies[not ctx.to_zero(t_next)], record, churn))  # line 9's test, on the host
  return core.steps_to_plan(steps)


def nfe(num_steps, final_sigma_zero=True):
  return 2 * num_steps - (1 if final_sigma_zero else 0)
