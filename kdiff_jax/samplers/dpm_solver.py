"""DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) and UniPC-2 (Zhao et al. 2023), in data-prediction form.

Both step in lambda = log(alpha/sigma) with data estimates D_i = x_hat(x_i, t_i). On the step
t_i -> t_{i+1}: h_i = lambda_{i+1} - lambda_i, and the exact solution of the probability-flow ODE
with D held constant is the first-order (DDIM) step
  x_{i+1} = (sigma_{i+1}/sigma_i)·x_i + alpha_{i+1}·phi_1(h_i)·D,   phi_1(h) = 1 - e^{-h}.

DPM-Solver++(2M): D = (1 + 1/(2r_i))·D_i - 1/(2r_i)·D_{i-1}, r_i = h_{i-1}/h_i; D = D_i on the
  first step and on a last step to sigma = 0 (or any last step with the option
  lower_order_final).  N NFE.
UniPC-2 (B(h) = e^{-h} - 1 'bh2' or -h 'bh1'), with UniPC's r_1 = (lambda_{i-1} - lambda_i)/h_i
  = -h_{i-1}/h_i (negative) and D1 = (D_{i-1} - D_i)/r_1:
  predictor (UniP-2)  x' = (first-order step) - alpha_{i+1}·B(h_i)·rho_p·D1
  corrector (UniC)    x_{i+1} = (first-order step) - alpha_{i+1}·B(h_i)·(rho_0·D1 + rho_1·(D' - D_i)),
                      D' = x_hat(x', t_{i+1}), which the next step reuses as its D_i (no extra NFE);
  rho_p = 1/2 and (rho_0, rho_1) solving [[1, 1], [r_1, 1]]·rho = [b_1, b_2],
  b_k = k!·h_phi_{k+1}/B(h) with UniPC's phi terms in hh = -h:
  h_phi_1 = e^{hh} - 1, h_phi_{k+1} = h_phi_k/hh - 1/k!  (Alg. 2 at order 2). The first step is
  order 1 (rho_p = rho_0 = 0, rho_1 = 1/2), and so is a last step to sigma = 0 or, with
  lower_order_final, any last step; no corrector on the last step.  N NFE, order 3.
lower_order_final=True is diffusers' first-order last step where the final sigma is not 0
(UniPCMultistepScheduler always; DPMSolverMultistepScheduler for N < 15 or euler_at_final).
The plans hold these quantities per step in float64 (`Step`, `UniPCStep`); the bodies combine
them in x's dtype.
"""
from typing import NamedTuple

import numpy as np

from kdiff_jax.samplers import core


class Step(NamedTuple):
  """DPM-Solver++(2M)'s step t_i -> t_{i+1}."""

  t: float                # t_i, where D_i = x_hat(x_i, t_i)
  sigma_ratio: float      # sigma_{i+1}/sigma_i
  alpha_phi_1: float      # alpha_{i+1}·phi_1(h_i) = alpha_{i+1}·(1 - e^{-h_i})
  one_over_2r: float      # 1/(2 r_i), r_i = h_{i-1}/h_i; 0 on a first-order step


class UniPCStep(NamedTuple):
  """UniPC-2's step t_i -> t_{i+1}."""

  t: float                # t_i
  s: float                # t_{i+1}, where the corrector evaluates D' = x_hat(x', t_{i+1})
  sigma_ratio: float      # sigma_{i+1}/sigma_i
  alpha_phi_1: float      # alpha_{i+1}·phi_1(h_i)
  alpha_B: float          # alpha_{i+1}·B(h_i); 0 where h_i is infinite (no correction)
  one_over_r: float       # 1/r_1; 0 on an order-1 step
  rho_p: float            # the predictor's weight of D1
  rho_0: float            # the corrector's weight of D1
  rho_1: float            # the corrector's weight of D' - D_i


def _dpm_solver_2m_step(carry, c, key, denoise):
  """x_{i+1} = (sigma_{i+1}/sigma_i)·x_i + alpha_{i+1}·phi_1(h)·((1 + 1/(2r))·D_i - 1/(2r)·D_{i-1})."""
  x = carry["x"]
  D_i, _ = denoise(x, c.t)
  (D_prev,) = carry["hist"]
  D = (1.0 + c.one_over_2r) * D_i - c.one_over_2r * D_prev
  return {"x": c.sigma_ratio * x + c.alpha_phi_1 * D, "hist": (D_i,)}


def _init_hist(size):
  def init(x, denoise):
    del denoise
    return {"x": x, "hist": tuple(0.0 * x for _ in range(size))}
  return init


def _lambda_step(ctx, i):
  """(t_i, t_{i+1}, h_i, sigma_{i+1}/sigma_i, alpha_{i+1}·phi_1(h_i)) in float64."""
  t, s = ctx.times[i], ctx.times[i + 1]
  lambda_t, lambda_s = ctx.lambda_(np.asarray([t, s]))
  h = float(lambda_s - lambda_t)
  phi_1 = -np.expm1(-h)  # 1 - e^{-h}
  return t, s, h, float(ctx.sigma(s) / ctx.sigma(t)), float(ctx.alpha(s) * phi_1)


def _first_order_final(ctx, i, lower_order_final):
  """Step i is first order because it lands on sigma = 0, or is the last and lower_order_final."""
  if not isinstance(lower_order_final, bool):
    raise ValueError(f"sampling.options.lower_order_final={lower_order_final!r}: "
                     "must be True or False")
  return ctx.to_zero(ctx.times[i + 1]) or (lower_order_final and i == ctx.num_steps - 1)


def dpm_solver_2m(ctx, lower_order_final=False):
  """lower_order_final: the last step is first order also where it does not land on sigma = 0."""
  steps, h_prev = [], None
  for i in range(ctx.num_steps):
    t, s, h, sigma_ratio, alpha_phi_1 = _lambda_step(ctx, i)
    first_order = (h_prev is None or not np.isfinite(h_prev)
                   or _first_order_final(ctx, i, lower_order_final))
    one_over_2r = 0.0 if first_order else 0.5 * h / h_prev  # 1/(2 r_i) = h_i/(2 h_{i-1})
    steps.append((_dpm_solver_2m_step, Step(t, sigma_ratio, alpha_phi_1, one_over_2r), False))
    h_prev = h
  return core.steps_to_plan(steps, _init_hist(1))


def _unipc_predict(x, D_i, D1, c):
  """UniP-2: the first-order step - alpha_{i+1}·B(h)·rho_p·D1."""
  return c.sigma_ratio * x + c.alpha_phi_1 * D_i - c.alpha_B * c.rho_p * D1


def _unipc_step(carry, c, key, denoise):
  """UniP-2 predicts x', D' = x_hat(x', t_{i+1}); UniC corrects with D'; D' is the next D_i."""
  x = carry["x"]
  D_i, D_prev = carry["hist"]
  D1 = c.one_over_r * (D_prev - D_i)
  D_new, _ = denoise(_unipc_predict(x, D_i, D1, c), c.s)
  correction = c.rho_0 * D1 + c.rho_1 * (D_new - D_i)
  x = c.sigma_ratio * x + c.alpha_phi_1 * D_i - c.alpha_B * correction
  return {"x": x, "hist": (D_new, D_i)}


def _unipc_last_step(carry, c, key, denoise):
  """The last step: the predictor only."""
  D_i, D_prev = carry["hist"]
  D1 = c.one_over_r * (D_prev - D_i)
  return {"x": _unipc_predict(carry["x"], D_i, D1, c), "hist": carry["hist"]}


def unipc_2(ctx, variant="bh2", lower_order_final=False):
  """UniPC with order 2 (UniP-2 + UniC-2): first step order 1, then order 2 (Zhao et al. 2023, Alg. 2/3).

  lower_order_final: the last step is order 1 also where it does not land on sigma = 0.
  """
  if variant not in ("bh1", "bh2"):
    raise ValueError(f"sampling.options.variant={variant!r}: allowed values are ['bh1', 'bh2']")
  steps, h_prev = [], None
  for i in range(ctx.num_steps):
    t, s, h, sigma_ratio, alpha_phi_1 = _lambda_step(ctx, i)
    order = 2 if (h_prev is not None and np.isfinite(h_prev) and np.isfinite(h)) else 1
    if _first_order_final(ctx, i, lower_order_final):
      order = 1
    # No correction (x_{i+1} = the first-order step) where h is infinite (a step from alpha = 0).
    step = UniPCStep(t=t, s=s, sigma_ratio=sigma_ratio, alpha_phi_1=alpha_phi_1, alpha_B=0.0,
                     one_over_r=0.0, rho_p=0.0, rho_0=0.0, rho_1=0.0)
    if np.isfinite(h):
      hh = -h
      B_h = hh if variant == "bh1" else np.expm1(hh)
      h_phi_1 = np.expm1(hh)
      h_phi_2 = h_phi_1 / hh - 1.0
      h_phi_3 = h_phi_2 / hh - 0.5
      b = np.array([h_phi_2 / B_h, h_phi_3 * 2.0 / B_h])
      step = step._replace(alpha_B=float(ctx.alpha(s)) * B_h)
      if order == 2:
        r_1 = -h_prev / h  # (lambda_{i-1} - lambda_i)/h_i
        rho_0, rho_1 = np.linalg.solve(np.array([[1.0, 1.0], [r_1, 1.0]]), b)
        step = step._replace(one_over_r=1.0 / r_1, rho_p=0.5, rho_0=rho_0, rho_1=rho_1)
      else:
        step = step._replace(rho_1=0.5)
    last = i == ctx.num_steps - 1
    steps.append((_unipc_last_step if last else _unipc_step, step, False))
    h_prev = h

  t0 = float(ctx.times[0])

  def init(x, denoise):
    D, _ = denoise(x, np.asarray(t0, x.dtype))
    return {"x": x, "hist": (D, 0.0 * D)}

  return core.steps_to_plan(steps, init)


def nfe(num_steps, final_sigma_zero=True):
  return num_steps
