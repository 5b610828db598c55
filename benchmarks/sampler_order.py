"""Measured global convergence order of every sampler (docs/samplers.md, "What the tests check").

Data N(mu, diag s^2) in float64 with its exact denoiser and exact flow map, the tests' own
(tests/references.py: gaussian_model, exact_flow; imported from the repository root). Karras grid (rho = 7) from eta = sigma/alpha
= 80 (t = 1 for VP, eta(1) ~ 157) to eta = 0.002, so every step is an ordinary one.
Deterministic methods: RMS error against the exact flow map. Stochastic ones (ddim eta=1,
euler_maruyama): W2 between the exact law of the output (Gaussian; mean and variance
propagated through the plan's affine steps) and the true marginal at t_end.
Order = log2(err(N)/err(2N)).

  python benchmarks/sampler_order.py [--grid karras] [--prediction x]
"""
import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

from kdiff_jax import samplers, schedules  # noqa: E402
from kdiff_jax.samplers import ddim, sde  # noqa: E402
from tests import references  # noqa: E402   (the repository root is on sys.path above)

STEPS = (10, 20, 40, 80, 160, 320)
MU = np.array([0.5, -1.0, 0.0, 2.0])
S = np.array([0.3, 1.0, 0.05, 0.7])
ETA_MAX, ETA_MIN = 80.0, 0.002

METHODS = [("euler", {}), ("heun", {}), ("ddim", {}), ("s_pndm", {}), ("f_pndm", {}),
           ("dpm_solver_2m", {}), ("unipc_2", {}), ("edm_heun", {}),
           ("ddim", {"eta": 1.0}), ("euler_maruyama", {})]


def _affine(body, c):
  """(a, b, c, d) of a stochastic step x' = a·x + b·x_hat + c·n_hat + d·z from its coefficients."""
  if body is ddim._ddim_noise_step:     # x' = alpha_s·x_hat + sigma_s_kept·n_hat + c_noise·z
    return 0.0, c.alpha_s, c.sigma_s_kept, c.c_noise
  if body is sde._euler_maruyama_step:  # x' = x + dt·(f·x - 2·sigma·lambda_dot·n_hat) + sqrt_dt_g·z
    return 1.0 + c.dt * c.f, 0.0, -2.0 * c.dt * c.sigma * c.lambda_dot, c.sqrt_dt_g
  raise ValueError(f"no affine form for the step {body.__name__}")


def exact_law(the_plan, schedule, t_start, mu, s, noise_std=1.0):
  """Mean and variance of the output of a plan of noisy affine steps (_affine) on N(mu, diag s^2)
  data: x_hat and n_hat are affine in x (references.gaussian_model), so the law stays Gaussian."""
  alpha = schedule.alpha(t_start)
  mean, var = alpha * mu, alpha**2 * s**2 + schedule.sigma(t_start) ** 2 * noise_std**2
  for phase in the_plan.phases:
    for i in range(phase.length):
      coefs = phase.step_coefs(jax.tree.map(lambda value, i=i: value[i], phase.coefs))
      a, b, c, d = _affine(phase.body, coefs)
      alpha, sigma = schedule.alpha(coefs.t), schedule.sigma(coefs.t)
      cc = alpha**2 * s**2 + sigma**2 * noise_std**2
      slope = a + b * alpha * s**2 / cc + c * sigma * noise_std**2 / cc
      offset = b * (mu - alpha * s**2 / cc * alpha * mu) - c * sigma * noise_std**2 / cc * alpha * mu
      mean, var = slope * mean + offset, slope**2 * var + d**2
  return mean, var


def global_error(schedule, method, options, num_steps, prediction, grid):
  t_start = min(1.0, float(schedule.eta_inv(np.float64(ETA_MAX))))
  t_end = float(schedule.eta_inv(np.float64(ETA_MIN)))
  kwargs = dict(schedule=schedule, prediction=prediction, method=method, num_steps=num_steps,
                grid=grid, t_start=t_start, t_end=t_end, **options)
  if method == "euler_maruyama" or options.get("eta", 0.0) > 0:
    mean, var = exact_law(samplers.plan(**kwargs), schedule, t_start, MU, S)
    alpha, sigma = schedule.alpha(t_end), schedule.sigma(t_end)
    w2 = np.sqrt(np.sum((mean - alpha * MU) ** 2 + (np.sqrt(var) - np.sqrt(alpha**2 * S**2 + sigma**2)) ** 2))
    return w2
  x_start = jax.random.normal(jax.random.key(0), (16, MU.size), np.float64) * 1.3
  model_fn = references.gaussian_model(schedule, prediction, MU, S, k=0.3)
  run = jax.jit(lambda x: samplers.sample(model_fn, x, k=0.3, **kwargs))
  out = np.asarray(run(x_start))
  exact = references.exact_flow(schedule, np.asarray(x_start), t_start, t_end, MU, S)
  return np.sqrt(np.mean((out - exact) ** 2))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--grid", default="karras")
  parser.add_argument("--prediction", default="x")
  parser.add_argument("--steps", default=",".join(map(str, STEPS)))
  args = parser.parse_args()
  steps = [int(n) for n in args.steps.split(",")]
  print(f"grid={args.grid}, prediction={args.prediction}, eta from {ETA_MAX} to {ETA_MIN}, float64")
  header = f"{'schedule':<15}{'method':<22}" + "".join(f"{'N=' + str(n):>10}" for n in steps)
  print(header + f"{'order':>8}")
  print("-" * (len(header) + 8))
  for schedule in (schedules.VP(), schedules.RectifiedFlow()):
    for method, options in METHODS:
      errors = [global_error(schedule, method, options, n, args.prediction, args.grid) for n in steps]
      orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
      name = method + "".join(f"({k}={v})" for k, v in options.items())
      label = "W2 " if method == "euler_maruyama" or options else ""
      print(f"{schedule.name:<15}{label + name:<22}" + "".join(f"{e:>10.2e}" for e in errors)
            + f"{orders[-1]:>8.2f}   (orders: {' '.join(f'{o:.2f}' for o in orders)})")


if __name__ == "__main__":
  main()
