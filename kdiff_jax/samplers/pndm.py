"""Pseudo numerical methods S-PNDM, F-PNDM (Liu et al., ICLR 2022, eq. 9; docs/samplers.md) and PLMS.

All three are driven by the noise estimate e = n_hat through the transfer
  phi(x_t, e, t, s) = (alpha_s/alpha_t)·x_t + alpha_s·(eta_s - eta_t)·e
(a DDIM step driven by e; the paper's alphabar form, diffusers' PNDMScheduler._get_prev_sample,
is the same map, and the coefficients are computed here in float64 on the host, so its
rearrangement against cancellation is not needed). phi divides by alpha_t: all three reject a
start where alpha(t_start) = 0.

S-PNDM: one pseudo improved Euler step, then pseudo linear multistep with (3e_k - e_{k-1})/2.
        N + 1 NFE.
F-PNDM: three pseudo-RK4 steps (midpoint m), then pseudo linear multistep with
        (55e_k - 59e_{k-1} + 37e_{k-2} - 9e_{k-3})/24.  N + 9 NFE.  Global order 2 on ordinary
        grids (the Adams weights assume nodes equally spaced in eta); order 4 only there
        (with midpoint='eta', which makes the warm-up classical RK4 in x_bar = x/alpha).
PLMS:   diffusers' PNDMScheduler(skip_prk_steps=True), what Stable Diffusion calls PNDM / PLMS
        (diffusers 0.42, PNDMScheduler.step_plms): the pseudo improved Euler step of S-PNDM,
        then pseudo linear multistep with the Adams–Bashforth weights of the history at hand,
        AB2 (3e_k - e_{k-1})/2, AB3 (23e_k - 16e_{k-1} + 5e_{k-2})/12, then AB4 as F-PNDM.
        N + 1 NFE (N = 1: one plain transfer step, 1 NFE, as diffusers).
A warm-up step that lands on sigma = 0 would call the model there; it is first order instead.
"""
from typing import NamedTuple

from kdiff_jax.samplers import core

# Adams–Bashforth weights of e_k, e_{k-1}, ... by order.
_ADAMS_BASHFORTH_WEIGHTS = {
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}
_WHY = "is eps-driven (its transfer phi divides by alpha(t))"


class Step(NamedTuple):
  """A pseudo improved Euler, pseudo linear multistep or first-order step t -> s."""

  t: float
  s: float
  phi: core.Transfer      # phi(., ., t, s)


class RK4Step(NamedTuple):
  """A pseudo RK4 step t -> s through the midpoint m."""

  t: float
  m: float
  s: float
  phi: core.Transfer      # phi(., ., t, s)
  phi_mid: core.Transfer  # phi(., ., t, m)


def improved_euler_step(carry, c, key, denoise):
  """e1 = e(x, t), e2 = e(phi(x, e1, t, s), s), x_s = phi(x, (e1 + e2)/2, t, s); keeps e1."""
  x = carry["x"]
  _, e1 = denoise(x, c.t)
  _, e2 = denoise(c.phi(x, e1), c.s)
  return {"x": c.phi(x, 0.5 * (e1 + e2)), "hist": core.push(carry["hist"], e1)}


def _rk4_step(carry, c, key, denoise):
  """Pseudo RK4: e1..e4 at t, m, m, s through phi; x_s = phi(x, (e1 + 2e2 + 2e3 + e4)/6, t, s); keeps e1."""
  x = carry["x"]
  _, e1 = denoise(x, c.t)
  _, e2 = denoise(c.phi_mid(x, e1), c.m)
  _, e3 = denoise(c.phi_mid(x, e2), c.m)
  _, e4 = denoise(c.phi(x, e3), c.s)
  e_prime = (e1 + 2.0 * e2 + 2.0 * e3 + e4) / 6.0
  return {"x": c.phi(x, e_prime), "hist": core.push(carry["hist"], e1)}


def _multistep_body(weights):
  def multistep_step(carry, c, key, denoise):
    """Pseudo linear multistep: e' = sum_j w_j·e_{k-j}, x_s = phi(x, e', t, s)."""
    x = carry["x"]
    _, e = denoise(x, c.t)
    e_prime = weights[0] * e
    for weight, e_old in zip(weights[1:], carry["hist"]):
      e_prime = e_prime + weight * e_old
    return {"x": c.phi(x, e_prime), "hist": core.push(carry["hist"], e)}
  return multistep_step


# order -> the pseudo linear multistep body with those weights (a longer history is ignored).
_multistep = {order: _multistep_body(weights) for order, weights in _ADAMS_BASHFORTH_WEIGHTS.items()}


def _step(ctx, t, s) -> Step:
  return Step(t=t, s=s, phi=ctx.phi(t, s))


def _init(history):
  def init(x, denoise):
    del denoise
    return {"x": x, "hist": tuple(0.0 * x for _ in range(history))}
  return init


def s_pndm(ctx):
  ctx.require_alpha_positive(_WHY)
  steps = []
  for i, (t, s) in enumerate(zip(ctx.times[:-1], ctx.times[1:])):
    coefs = _step(ctx, t, s)
    if i == 0:
      body = core.transfer_step if ctx.to_zero(s) else improved_euler_step
    else:
      body = _multistep[2]
    steps.append((body, coefs, False))
  return core.steps_to_plan(steps, _init(1))


def f_pndm(ctx, midpoint="t"):
  """midpoint='t': m = (t + s)/2 (the paper's t - delta/2); 'eta': eta_m = (eta_t + eta_s)/2."""
  ctx.require_alpha_positive(_WHY)
  if midpoint not in ("t", "eta"):
    raise ValueError(f"sampling.options.midpoint={midpoint!r}: allowed values are ['t', 'eta']")
  steps = []
  for i, (t, s) in enumerate(zip(ctx.times[:-1], ctx.times[1:])):
    coefs = _step(ctx, t, s)
    if i >= 3:
      steps.append((_multistep[4], coefs, False))
    elif ctx.to_zero(s):
      steps.append((core.transfer_step, coefs, False))
    else:
      if midpoint == "t":
        m = 0.5 * (t + s)
      else:
        m = float(ctx.schedule.eta_inv(0.5 * (ctx.eta(t) + ctx.eta(s))))
      steps.append((_rk4_step, RK4Step(t=t, m=m, s=s, phi=coefs.phi, phi_mid=ctx.phi(t, m)),
                     False))
  return core.steps_to_plan(steps, _init(3))


def plms(ctx):
  """PLMS (diffusers' PNDMScheduler(skip_prk_steps=True)): step 0 pseudo improved Euler, step i
  pseudo linear multistep of order min(i + 1, 4); x_s = phi(x_t, e', t, s) throughout."""
  ctx.require_alpha_positive(_WHY)
  steps = []
  for i, (t, s) in enumerate(zip(ctx.times[:-1], ctx.times[1:])):
    if i > 0:
      body = _multistep[min(i + 1, 4)]
    else:  # diffusers' one-step PLMS makes no second evaluation
      body = core.transfer_step if ctx.num_steps == 1 else improved_euler_step
    steps.append((body, _step(ctx, t, s), False))
  return core.steps_to_plan(steps, _init(3))


def plms_nfe(num_steps, final_sigma_zero=True):
  return 1 if num_steps == 1 else num_steps + 1


def s_pndm_nfe(num_steps, final_sigma_zero=True):
  return 1 if (num_steps == 1 and final_sigma_zero) else num_steps + 1


def f_pndm_nfe(num_steps, final_sigma_zero=True):
  warm_up = min(3, num_steps)
  first_order_last = final_sigma_zero and num_steps <= 3
  return 4 * warm_up + (num_steps - warm_up) - (3 if first_order_last else 0)
