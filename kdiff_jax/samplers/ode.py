"""Flow Euler and Heun in t on the probability-flow velocity (specs/samplers.md).

dx/dt = alpha_dot·x_hat + sigma_dot·n_hat  (= (sigma_dot/sigma)·x + (alpha_dot - alpha·sigma_dot/sigma)·x_hat).
Euler: x_s = x_t + (s - t)·v(x_t, t). Heun: the trapezoid correction with v at the Euler point;
the last step is Euler (never a model call at t_end). For rectified flow Euler is exactly DDIM.
"""
from kdiff_jax.samplers import core


def _velocity_coefs(ctx, t, s):
  """Coefficients of x_s = x_t + (s - t)·(alpha_dot_t·x_hat + sigma_dot_t·n_hat)."""
  dt = s - t
  return {"t": t, "a": 1.0, "b": dt * float(ctx.alpha_dot(t)), "c": dt * float(ctx.sigma_dot(t))}


def euler(ctx):
  """x_s = x_t + (s - t)·v(x_t, t).  N NFE."""
  times = ctx.times
  return core.steps_to_plan([(core.linear_step, _velocity_coefs(ctx, t, s), False)
                             for t, s in zip(times[:-1], times[1:])])


def _heun_step(carry, c, key, denoise):
  """x' = x + dt·v(x, t);  x_s = x + dt·(v(x, t) + v(x', s))/2  (Heun 1900; EDM Alg. 1 in t)."""
  x = carry["x"]
  x_hat, n_hat = denoise(x, c["t"])
  v1 = c["alpha_dot_t"] * x_hat + c["sigma_dot_t"] * n_hat
  x_euler = x + c["dt"] * v1
  x_hat, n_hat = denoise(x_euler, c["s"])
  v2 = c["alpha_dot_s"] * x_hat + c["sigma_dot_s"] * n_hat
  return {**carry, "x": x + c["dt"] * (0.5 * (v1 + v2))}


def heun(ctx):
  """Heun steps, the last one Euler.  2N - 1 NFE."""
  times, steps = ctx.times, []
  for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
    if i == ctx.num_steps - 1:
      steps.append((core.linear_step, _velocity_coefs(ctx, t, s), False))
    else:
      steps.append((_heun_step, {"t": t, "s": s, "dt": s - t,
                                 "alpha_dot_t": float(ctx.alpha_dot(t)), "sigma_dot_t": float(ctx.sigma_dot(t)),
                                 "alpha_dot_s": float(ctx.alpha_dot(s)), "sigma_dot_s": float(ctx.sigma_dot(s))},
                    False))
  return core.steps_to_plan(steps)


def euler_nfe(num_steps, final_sigma_zero=True):
  return num_steps


def heun_nfe(num_steps, final_sigma_zero=True):
  return 2 * num_steps - 1
