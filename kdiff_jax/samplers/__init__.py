"""Samplers: one core, every method (docs/samplers.md).

  x0 = sample(model_fn, noise, schedule=..., prediction=..., method=..., num_steps=...)

model_fn(x_t, t) returns the raw network output in parameterization `prediction`
(parameterization.PREDICTIONS) at a [B] time vector t of x's dtype (float32 unless the caller
samples in float64); `noise` is x at t_start, already scaled by noise_std. Coefficients are
precomputed on the host in float64 from the schedule; the loop is lax.scan over a static number
of steps, so `jax.jit(lambda noise, key: sample(...))` works. Grids: grids.GRIDS.

  method          update                                                  NFE
  euler           flow Euler in t on the velocity                         N
  heun            flow Heun in t, last step Euler                         2N - 1
  ddim            DDIM(eta), x0 form; option eta >= 0 (stochastic if > 0)  N
  s_pndm          pseudo improved Euler, then pseudo linear multistep     N + 1
  f_pndm          3 pseudo-RK4 steps, then pseudo linear multistep        N + 9
  plms            diffusers' PNDM(skip_prk_steps): improved Euler, AB2-4  N + 1
  dpm_solver_2m   DPM-Solver++(2M); option lower_order_final              N
  unipc_2         UniPC with order 2 (UniP-2 + UniC); variant, ...        N
  edm_heun        EDM Heun in x/alpha, sigma/alpha; S_churn, S_tmin, ...  2N - 1
  euler_maruyama  reverse SDE, Euler–Maruyama                             N

MeanFlow's `mean_flow` (samplers/mean_flow.py) steps the trained average velocity on the same
grids. IMM's few-step samplers (`imm.METHODS`: pushforward, restart) run on the same core and grids
with their own step contract, the trained one-step map in place of a denoiser (samplers/imm.py).
"""
import inspect

import jax.numpy as jnp

from kdiff_jax import parameterization
from kdiff_jax import schedules as schedules_lib
from kdiff_jax.samplers import core
from kdiff_jax.samplers import ddim
from kdiff_jax.samplers import dpm_solver
from kdiff_jax.samplers import edm
from kdiff_jax.samplers import grids
from kdiff_jax.samplers import guidance
from kdiff_jax.samplers import imm
from kdiff_jax.samplers import mean_flow
from kdiff_jax.samplers import ode
from kdiff_jax.samplers import pndm
from kdiff_jax.samplers import sde
from kdiff_jax.samplers import tvm
from kdiff_jax.samplers.grids import GRIDS, time_grid

# name -> (plan builder(ctx, **options), nfe(num_steps, final_sigma_zero))
_REGISTRY = {
    "euler": (ode.euler, ode.euler_nfe),
    "heun": (ode.heun, ode.heun_nfe),
    "ddim": (ddim.ddim, ddim.nfe),
    "s_pndm": (pndm.s_pndm, pndm.s_pndm_nfe),
    "f_pndm": (pndm.f_pndm, pndm.f_pndm_nfe),
    "plms": (pndm.plms, pndm.plms_nfe),
    "dpm_solver_2m": (dpm_solver.dpm_solver_2m, dpm_solver.nfe),
    "unipc_2": (dpm_solver.unipc_2, dpm_solver.nfe),
    "edm_heun": (edm.edm_heun, edm.nfe),
    "euler_maruyama": (sde.euler_maruyama, sde.nfe),
}
METHODS = tuple(_REGISTRY)

__all__ = ["sample", "nfe", "plan", "time_grid", "configured_options", "option_defaults",
           "METHODS", "GRIDS", "guidance", "imm", "mean_flow"]


def _lookup(method):
  if method not in _REGISTRY:
    raise ValueError(f"sampling.method={method!r}: allowed values are {list(METHODS)}")
  return _REGISTRY[method]


def option_defaults() -> dict:
  """{option: default} of every method's options and of the grid options (rho, shift, ...)."""
  defaults = {}
  for builder, _ in _REGISTRY.values():
    defaults.update({name: p.default for name, p in inspect.signature(builder).parameters.items()
                     if name != "ctx"})
  grid_parameters = inspect.signature(grids.time_grid).parameters
  defaults.update({name: grid_parameters[name].default for names in grids.GRID_READS.values()
                   for name in names})
  return defaults


def _method_reads(method) -> set:
  """The options a method reads (IMM's and MeanFlow's methods read none)."""
  if method in imm.METHODS + mean_flow.METHODS:
    return set()
  if method in tvm.METHODS:   # TVM's reads none either
    return set()
  return set(inspect.signature(_lookup(method)[0]).parameters) - {"ctx"}


def configured_options(method, grid, options) -> dict:
  """The entries of `options` (config.sampling.options) that `method` and `grid` read.

  An unknown option, or one changed from its default that neither reads (eta with heun, rho
  with uniform_t), is an error naming the field and who reads it.
  """
  reads = _method_reads(method) | set(grids.GRID_READS.get(grid, ()))
  defaults = option_defaults()
  taken = {}
  for name, value in dict(options).items():
    if name not in defaults:
      raise ValueError(f"sampling.options.{name}: unknown option; allowed are {sorted(defaults)}")
    if name in reads:
      taken[name] = value
    elif value != defaults[name]:
      readers = sorted(m for m in _REGISTRY if name in _method_reads(m))
      readers += [f"grid {g}" for g, names in grids.GRID_READS.items() if name in names]
      raise ValueError(f"sampling.options.{name}={value!r} has no effect with sampling.method="
                       f"{method!r} and sampling.grid={grid!r}; it is read by {readers}")
  return taken


def nfe(method, num_steps, *, final_sigma_zero=True):
  """Model calls of `method` with `num_steps` steps (final_sigma_zero: sigma(t_end) = 0)."""
  grids._check_num_steps(num_steps)
  return _lookup(method)[1](int(num_steps), final_sigma_zero)


def plan(*, schedule, prediction, method, num_steps, grid="uniform_t", t_start=1.0, t_end=0.0,
         noise_std=1.0, **method_options):
  """The host-side plan (phases of step bodies and float64 coefficients) that `sample` runs."""
  schedule = schedules_lib.get(schedule) if isinstance(schedule, str) else schedule
  parameterization.check_prediction(prediction, "prediction")
  builder, _ = _lookup(method)
  grid_options = {name: method_options.pop(name) for name in grids.GRID_OPTIONS if name in method_options}
  allowed = [p for p in inspect.signature(builder).parameters if p != "ctx"]
  unknown = sorted(set(method_options) - set(allowed))
  if unknown:
    raise ValueError(f"sampling.method={method!r}: unknown options {unknown}; allowed are "
                     f"{allowed} and the grid options {list(grids.GRID_OPTIONS)}")
  times = grids.time_grid(schedule, num_steps, grid, t_start=t_start, t_end=t_end, **grid_options)
  ctx = core.Context(schedule, times, method, prediction, float(noise_std))
  the_plan = builder(ctx, **method_options)  # methods that need alpha > 0 say so first
  if prediction in ("eps", "score") and ctx.alpha_zero(times[0]):
    raise ValueError(
        f"prediction={prediction!r} gives no x_hat where alpha(t) = 0, and alpha(t_start={times[0]}) = 0 "
        f"for schedule {schedule.name!r}: start at sampling.t_start < 1 (e.g. 0.999)")
  return the_plan


def sample(model_fn, noise, *, schedule, prediction, method, num_steps, key=None, grid="uniform_t",
           t_start=1.0, t_end=0.0, k=None, noise_std=1.0, min_divisor=0.0, scan=True,
           **method_options):
  """x at t_end from noise = x at t_start: `num_steps` steps of `method` on `grid`.

  schedule: a schedules.Schedule or its name. k: k-Diff's k for prediction='u_k', or k(t) of
  the step's [B] time vector.
  min_divisor: clamp passed to parameterization.to_x_eps. scan=False runs a Python loop
  (same math; for debugging and counting calls). method_options: the method's options
  (eta; S_churn, S_tmin, S_tmax, S_noise; midpoint; variant, lower_order_final) and the grid's
  (rho, shift, sigma_max, sigma_min, steps_offset). key: needed by stochastic methods, split once
  per step.
  """
  schedule = schedules_lib.get(schedule) if isinstance(schedule, str) else schedule
  the_plan = plan(schedule=schedule, prediction=prediction, method=method, num_steps=num_steps,
                  grid=grid, t_start=t_start, t_end=t_end, noise_std=noise_std, **method_options)
  x = jnp.asarray(noise)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # never accumulate in bf16
  denoise = core.make_denoiser(model_fn, prediction, schedule, k=k, noise_std=noise_std,
                               min_divisor=min_divisor)
  return core.run(the_plan, x, denoise, key, scan=scan, method=method)
