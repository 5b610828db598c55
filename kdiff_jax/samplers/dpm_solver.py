"""DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) and UniPC-2 (Zhao et al. 2023), in data-prediction form.

With h_i = lambda_{i+1} - lambda_i (lambda = log(alpha/sigma)) and D_i = x_hat(x_i, t_i):

DPM-Solver++(2M):
  x_{i+1} = (sigma_{i+1}/sigma_i)·x_i - alpha_{i+1}·(e^{-h_i} - 1)·D,
  D = D_i on the first step and on a last step to sigma = 0 (or any last step with the option
  lower_order_final), else with r_i = h_{i-1}/h_i
  D = (1 + 1/(2r_i))·D_i - (1/(2r_i))·D_{i-1}.  N NFE.
UniPC-2 (B(h) = e^{-h} - 1 'bh2' or -h 'bh1'), with D1 = (D_{i-1} - D_i)/r_i and
r_i = (lambda_{i-1} - lambda_i)/h_i = -h_{i-1}/h_i (UniPC's r_1, negative):
  predictor (UniP-2)  x' = (sigma_{i+1}/sigma_i)·x_i - alpha_{i+1}·(e^{-h_i} - 1)·D_i
                           - alpha_{i+1}·B(h_i)·rho_p·D1
  corrector (UniC)    x_{i+1} = (same first two terms) - alpha_{i+1}·B(h_i)·(rho_0·D1 + rho_1·(D' - D_i)),
                      D' = x_hat(x', t_{i+1}), which the next step reuses as its D_i (no extra NFE);
  rho_p = 1/2 and (rho_0, rho_1) solving [[1, 1], [r_i, 1]]·rho = [b_1, b_2] with
  b_1 = h_phi_k/B(h), b_2 = 2·(h_phi_k/(-h) - 1/2)/B(h), h_phi_k = (e^{-h} - 1)/(-h) - 1
  (Alg. 2 at order 2; the first step is order 1: rho_p = rho_0 = 0, rho_1 = 1/2, and so is a
  last step to sigma = 0 or, with lower_order_final, any last step); no corrector on the last
  step.  N NFE, order 3.
lower_order_final=True is diffusers' first-order last step where the final sigma is not 0
(UniPCMultistepScheduler always; DPMSolverMultistepScheduler for N < 15 or euler_at_final).
The float64 plan holds sigma_ratio = sigma_{i+1}/sigma_i, alpha_phi = -alpha_{i+1}·(e^{-h} - 1)
and alpha_B = alpha_{i+1}·B(h).
"""
import numpy as np

from kdiff_jax.samplers import core


def _dpm_solver_2m_step(carry, c, key, denoise):
  """x_s = (sigma_s/sigma_t)·x_t + alpha_phi·((1 + 1/(2r))·D_i - (1/(2r))·D_{i-1}); keeps D_i."""
  x = carry["x"]
  D_i, _ = denoise(x, c["t"])
  (D_prev,) = carry["hist"]
  D = (1.0 + c["half_inv_r"]) * D_i - c["half_inv_r"] * D_prev
  return {"x": c["sigma_ratio"] * x + c["alpha_phi"] * D, "hist": (D_i,)}


def _init_hist(size):
  def init(x, denoise):
    del denoise
    return {"x": x, "hist": tuple(0.0 * x for _ in range(size))}
  return init


def _step_quantities(ctx, i):
  """(t, s, h, sigma_ratio, alpha_phi) of step i in float64."""
  t, s = ctx.times[i], ctx.times[i + 1]
  lambdas = ctx.lambda_(np.asarray([t, s]))
  h = float(lambdas[1] - lambdas[0])
  return t, s, h, float(ctx.sigma(s) / ctx.sigma(t)), float(-ctx.alpha(s) * np.expm1(-h))


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
    t, s, h, sigma_ratio, alpha_phi = _step_quantities(ctx, i)
    first_order = (h_prev is None or not np.isfinite(h_prev)
                   or _first_order_final(ctx, i, lower_order_final))
    half_inv_r = 0.0 if first_order else 0.5 * h / h_prev  # 1/(2r), r = h_{i-1}/h_i
    steps.append((_dpm_solver_2m_step, {"t": t, "sigma_ratio": sigma_ratio,
                                        "alpha_phi": alpha_phi, "half_inv_r": half_inv_r}, False))
    h_prev = h
  return core.steps_to_plan(steps, _init_hist(1))


def _unipc_predict(x, D_i, D1, c):
  return c["sigma_ratio"] * x + c["alpha_phi"] * D_i - c["alpha_B"] * c["rho_p"] * D1


def _unipc_step(carry, c, key, denoise):
  """UniP-2 predicts x', D' = x_hat(x', s); UniC corrects with D'; D' is the next step's D_i."""
  x = carry["x"]
  D_i, D_prev = carry["hist"]
  D1 = c["inv_r"] * (D_prev - D_i)
  D_new, _ = denoise(_unipc_predict(x, D_i, D1, c), c["s"])
  correction = c["rho_0"] * D1 + c["rho_1"] * (D_new - D_i)
  x = c["sigma_ratio"] * x + c["alpha_phi"] * D_i - c["alpha_B"] * correction
  return {"x": x, "hist": (D_new, D_i)}


def _unipc_last_step(carry, c, key, denoise):
  """The last step: the predictor only."""
  D_i, D_prev = carry["hist"]
  D1 = c["inv_r"] * (D_prev - D_i)
  return {"x": _unipc_predict(carry["x"], D_i, D1, c), "hist": carry["hist"]}


def unipc_2(ctx, variant="bh2", lower_order_final=False):
  """UniPC with order 2 (UniP-2 + UniC-2): first step order 1, then order 2 (Zhao et al. 2023, Alg. 2/3).

  lower_order_final: the last step is order 1 also where it does not land on sigma = 0.
  """
  if variant not in ("bh1", "bh2"):
    raise ValueError(f"sampling.options.variant={variant!r}: allowed values are ['bh1', 'bh2']")
  steps, h_prev = [], None
  for i in range(ctx.num_steps):
    t, s, h, sigma_ratio, alpha_phi = _step_quantities(ctx, i)
    order = 2 if (h_prev is not None and np.isfinite(h_prev) and np.isfinite(h)) else 1
    if _first_order_final(ctx, i, lower_order_final):
      order = 1
    # No correction (x_s = the DDIM prediction) where h is infinite (a step from alpha = 0).
    coefs = {"t": t, "s": s, "sigma_ratio": sigma_ratio, "alpha_phi": alpha_phi,
             "alpha_B": 0.0, "inv_r": 0.0, "rho_p": 0.0, "rho_0": 0.0, "rho_1": 0.0}
    if np.isfinite(h):
      B_h = -h if variant == "bh1" else np.expm1(-h)
      h_phi_k = np.expm1(-h) / -h - 1.0
      b = np.array([h_phi_k / B_h, (h_phi_k / -h - 0.5) * 2.0 / B_h])
      coefs["alpha_B"] = float(ctx.alpha(s)) * B_h
      if order == 2:
        r = -h_prev / h  # UniPC's r_1 = (lambda_{i-1} - lambda_i)/h_i
        rho_0, rho_1 = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), b)
        coefs.update(inv_r=1.0 / r, rho_p=0.5, rho_0=rho_0, rho_1=rho_1)
      else:
        coefs["rho_1"] = 0.5
    last = i == ctx.num_steps - 1
    steps.append((_unipc_last_step if last else _unipc_step, coefs, False))
    h_prev = h

  t0 = float(ctx.times[0])

  def init(x, denoise):
    D, _ = denoise(x, np.asarray(t0, x.dtype))
    return {"x": x, "hist": (D, 0.0 * D)}

  return core.steps_to_plan(steps, init)


def nfe(num_steps, final_sigma_zero=True):
  return num_steps
