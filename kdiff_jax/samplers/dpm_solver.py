"""DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) and UniPC-2 (Zhao et al. 2023), in x0 form.

DPM-Solver++(2M):
  x_{i+1} = (sigma_{i+1}/sigma_i)·x_i - alpha_{i+1}·expm1(-h_i)·D,  h_i = lambda_{i+1} - lambda_i,
  D = D_i on the first step and on a last step to sigma = 0, else with r = h_{i-1}/h_i
  D = (1 + 1/(2r))·D_i - (1/(2r))·D_{i-1}.  N NFE.
UniPC-2 (data prediction, B(h) = expm1(-h) 'bh2' or -h 'bh1'): the UniP-2 predictor, then the
UniC corrector with the model output at the predicted point, which the next step reuses; no
corrector on the last step.  N NFE, order 3.
"""
import numpy as np

from kdiff_jax.samplers import core


def _dpm_step(carry, c, key, denoise):
  """x_s = a·x_t + b0·D_i + b1·D_{i-1}; keeps D_i."""
  x = carry["x"]
  D, _ = denoise(x, c["t"])
  (D_prev,) = carry["hist"]
  return {"x": c["a"] * x + c["b0"] * D + c["b1"] * D_prev, "hist": (D,)}


def _init_hist(size):
  def init(x, denoise):
    del denoise
    return {"x": x, "hist": tuple(0.0 * x for _ in range(size))}
  return init


def dpm_solver_2m(ctx):
  times, lambdas = ctx.times, ctx.lambda_(ctx.times)
  steps, h_prev = [], None
  for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
    h = float(lambdas[i + 1] - lambdas[i])
    a = float(ctx.sigma(s) / ctx.sigma(t))
    B = float(-ctx.alpha(s) * np.expm1(-h))
    if h_prev is None or ctx.to_zero(s) or not np.isfinite(h_prev):
      b0, b1 = B, 0.0
    else:
      r = h_prev / h
      b0, b1 = B * (1.0 + 0.5 / r), -B * 0.5 / r
    steps.append((_dpm_step, {"t": t, "a": a, "b0": b0, "b1": b1}, False))
    h_prev = h
  return core.steps_to_plan(steps, _init_hist(1))


def _unipc_step(carry, c, key, denoise):
  """Predict x_p = a·x + p0·D_i + p1·D_{i-1}; D_new = D(x_p, s); correct
  x_s = a·x + w0·D_i + w1·D_{i-1} + w2·D_new; D_new becomes D_i of the next step (no extra NFE)."""
  x = carry["x"]
  D, D_prev = carry["hist"]
  x_pred = c["a"] * x + c["p0"] * D + c["p1"] * D_prev
  D_new, _ = denoise(x_pred, c["s"])
  x = c["a"] * x + c["w0"] * D + c["w1"] * D_prev + c["w2"] * D_new
  return {"x": x, "hist": (D_new, D)}


def _unipc_last_step(carry, c, key, denoise):
  """The last step: predictor only."""
  D, D_prev = carry["hist"]
  return {"x": c["a"] * carry["x"] + c["p0"] * D + c["p1"] * D_prev, "hist": carry["hist"]}


def unipc_2(ctx, variant="bh2"):
  """UniPC with order 2 (UniP-2 + UniC-2): first step order 1, then order 2 (Zhao et al. 2023, Alg. 2/3)."""
  if variant not in ("bh1", "bh2"):
    raise ValueError(f"sampling.options.variant={variant!r}: allowed values are ['bh1', 'bh2']")
  times, lambdas = ctx.times, ctx.lambda_(ctx.times)
  steps = []
  for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
    alpha_s = float(ctx.alpha(s))
    h = float(lambdas[i + 1] - lambdas[i])
    a = float(ctx.sigma(s) / ctx.sigma(t))
    base = float(-alpha_s * np.expm1(-h))  # the DDIM weight on D_i
    last = i == ctx.num_steps - 1
    r1 = float((lambdas[i - 1] - lambdas[i]) / h) if i > 0 else np.nan
    order = 2 if (i > 0 and np.isfinite(r1) and np.isfinite(h)) else 1
    if ctx.to_zero(s):
      order = 1
    # Defaults: no correction (x_s = the DDIM prediction), as on a step from alpha = 0 (h = inf).
    coefs = {"t": t, "s": s, "a": a, "p0": base, "p1": 0.0, "w0": base, "w1": 0.0, "w2": 0.0}
    if np.isfinite(h):
      hh = -h
      h_phi_1 = np.expm1(hh)
      B_h = hh if variant == "bh1" else np.expm1(hh)
      h_phi_k = h_phi_1 / hh - 1.0
      b1 = h_phi_k / B_h
      b2 = (h_phi_k / hh - 0.5) * 2.0 / B_h
      k = alpha_s * B_h  # x = x_t_ - alpha_s·B_h·(...)
      if order == 2:
        coefs["p1"] = -k * 0.5 / r1
        coefs["p0"] = base + k * 0.5 / r1
        rho0, rho1 = np.linalg.solve(np.array([[1.0, 1.0], [r1, 1.0]]), np.array([b1, b2]))
        coefs["w1"] = -k * rho0 / r1
        coefs["w2"] = -k * rho1
        coefs["w0"] = base + k * rho0 / r1 + k * rho1
      else:
        coefs["w2"] = -k * 0.5
        coefs["w0"] = base + k * 0.5
    steps.append((_unipc_last_step if last else _unipc_step, coefs, False))

  t0 = float(times[0])

  def init(x, denoise):
    D, _ = denoise(x, np.asarray(t0, x.dtype))
    return {"x": x, "hist": (D, 0.0 * D)}

  return core.steps_to_plan(steps, init)


def nfe(num_steps, final_sigma_zero=True):
  return num_steps
