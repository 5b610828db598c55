"""Time grids t_0 = t_start > t_1 > ... > t_N = t_end for the samplers (docs/samplers.md).

  uniform_t       t_i linear in t.
  karras          EDM's rho-ramp in sigma_bar = eta = sigma/alpha (Karras et al. 2022, eq. 5):
                  eta_i = (eta_max^(1/rho) + i/(M-1)·(eta_min^(1/rho) - eta_max^(1/rho)))^rho.
  uniform_lambda  lambda = log(alpha/sigma) = -log(eta) linear (DPM-Solver's logSNR grid).
  shift           SD3's shift of a uniform grid: t' = a·t/(1 + (a-1)·t) (Esser et al. 2024).
  cifar           IMM's CIFAR-10 grids (Zhou et al. 2025): [t_start, t_end] for 1 step,
                  [t_start, eta^-1(1.4), t_end] for 2 (0.5833 on rectified flow).

diffusers' `timestep_spacing` (VP schedule only): N DDPM timesteps k_0 > ... > k_{N-1} of the
T = 1000 (VP.num_steps) training steps, then t_end. Our VP places DDPM's alphabar_k (diffusers'
alphas_cumprod[k], 0-indexed) at t = (k + 1)/T, so t_i = (k_i + 1)/T, and t = 0 is alphabar = 1.
With o = steps_offset (read by the two leading grids only, as in diffusers):

  leading            DDIMScheduler / PNDMScheduler: k_i = o + (N-1-i)·floor(T/N).
  leading_multistep  DPMSolverMultistepScheduler / UniPCMultistepScheduler:
                     k_i = o + (N-i)·floor(T/(N+1)) (N+1 points, the lowest dropped).
  linspace           DPMSolverMultistep / UniPCMultistep: k_i = round((N-i)/N·(T-1)).
  trailing           all four: k_i = round(T - i·T/N) - 1.

The last step goes to t_end, which is where diffusers ends:
  DDIM / PNDM   set_alpha_to_one=True: alphabar = 1, t_end = 0; False: alphabar_0, t_end = 1/T
                (and alphabar_{o - floor(T/N)}, t_end = (o - floor(T/N) + 1)/T, where that index
                is >= 0: a leading grid with o >= floor(T/N)).
  DPM-Solver++ / UniPC  final_sigmas_type='zero': t_end = 0; 'sigma_min': t_end = 1/T. A last
                step to sigma = 0 is first order; diffusers makes it first order also where
                lower_order_final applies (UniPC always, DPMSolverMultistep for N < 15, or
                euler_at_final): the methods' option lower_order_final=True.
These grids start at t_0 = (k_0 + 1)/T (diffusers' first model call; the noise is x there), so
they need t_start = 1. DDIM / PNDM step a fixed floor(T/N) below each k_i, so with linspace (and
with trailing where N does not divide T) their step's target is not the next step's source:
diffusers' DDIM and PNDM are reproduced with leading, and with trailing for N dividing T.

The eta-grids need finite, positive end points. An end where eta is infinite (alpha(t_start) = 0,
e.g. rectified flow at t = 1; eta > 1e8 counts as infinite) or zero (sigma(t_end) = 0) is kept
as its own grid point and the ramp runs between sigma_max (default 80) and sigma_min
(default 0.002), EDM's values; that is EDM's "plus sigma_N = 0". Explicit sigma_max /
sigma_min inside (eta(t_end), eta(t_start)) do the same. Each step's target time is the next
step's source time; t_start (except on the diffusers grids) and t_end are always hit exactly.
"""
import numpy as np

from kdiff_jax import schedules

# grid -> the options of time_grid it reads (config.sampling.options; karras also reads the
# sigma_max / sigma_min overrides, which are not config fields).
GRID_READS = {"uniform_t": (), "karras": ("rho",), "uniform_lambda": (), "shift": ("shift",),
              "cifar": (), "leading": ("steps_offset",), "leading_multistep": ("steps_offset",),
              "linspace": (), "trailing": ()}
GRIDS = tuple(GRID_READS)
GRID_OPTIONS = ("rho", "shift", "sigma_max", "sigma_min", "steps_offset")
DIFFUSERS_GRIDS = ("leading", "leading_multistep", "linspace", "trailing")

# eta(t) above this is treated as infinite: alpha(t) is zero up to rounding (cosine at t = 1).
ETA_INFINITE = 1e8
SIGMA_MAX = 80.0
SIGMA_MIN = 0.002
CIFAR_MIDPOINT_ETA = 1.4


def eta_of(schedule, t):
  """eta = sigma/alpha in float64 on the host, inf where alpha = 0."""
  t = np.asarray(t, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.asarray(schedule.sigma(t) / schedule.alpha(t), np.float64)


def time_grid(schedule, num_steps, grid="uniform_t", *, t_start=1.0, t_end=0.0, rho=7.0,
              shift=3.0, sigma_max=None, sigma_min=None, steps_offset=0):
  """The N+1 float64 times of an N-step sampler; `grid` may also be an explicit decreasing sequence."""
  num_steps = _check_num_steps(num_steps)
  if not isinstance(grid, str):
    times = np.asarray(grid, np.float64)
    if times.shape != (num_steps + 1,):
      raise ValueError(f"sampling.grid: an explicit grid needs num_steps + 1 = {num_steps + 1} "
                       f"times, got shape {times.shape}")
    return _check_times(schedule, times)
  t_start, t_end = float(t_start), float(t_end)
  if not 0.0 <= t_end < t_start <= 1.0:
    raise ValueError(f"sampling.t_start={t_start}, sampling.t_end={t_end}: need 0 <= t_end < t_start <= 1")
  if grid == "uniform_t":
    times = np.linspace(t_start, t_end, num_steps + 1)
  elif grid == "shift":
    if shift <= 0:
      raise ValueError(f"sampling.options.shift={shift}: must be > 0")
    unshift = lambda t: t / (shift - (shift - 1.0) * t)
    u = np.linspace(unshift(t_start), unshift(t_end), num_steps + 1)
    times = shift * u / (1.0 + (shift - 1.0) * u)
  elif grid in ("karras", "uniform_lambda"):
    times = _eta_grid(schedule, num_steps, grid, t_start, t_end, rho, sigma_max, sigma_min)
  elif grid == "cifar":
    if num_steps not in (1, 2):
      raise ValueError(f"sampling.grid='cifar' has 1- and 2-step grids only, not "
                       f"sampling.num_steps={num_steps}; use 'uniform_t' or 'karras'")
    middle = [float(schedule.eta_inv(CIFAR_MIDPOINT_ETA))] if num_steps == 2 else []
    times = np.asarray([t_start] + middle + [t_end], np.float64)
  elif grid in DIFFUSERS_GRIDS:
    return _check_times(schedule, _diffusers_grid(schedule, num_steps, grid, t_start, t_end, steps_offset))
  else:
    raise ValueError(f"sampling.grid={grid!r}: allowed values are {list(GRIDS)} "
                     "(or an explicit decreasing sequence of times)")
  times[0], times[-1] = t_start, t_end
  return _check_times(schedule, times)


def _eta_grid(schedule, num_steps, grid, t_start, t_end, rho, sigma_max, sigma_min):
  eta_start, eta_end = eta_of(schedule, t_start), eta_of(schedule, t_end)
  head, tail = [], []
  top, bottom = float(eta_start), float(eta_end)
  if not top <= ETA_INFINITE or (sigma_max is not None and sigma_max < top):
    top = SIGMA_MAX if sigma_max is None else float(sigma_max)
    head = [t_start]
  if bottom == 0.0 or (sigma_min is not None and sigma_min > bottom):
    bottom = SIGMA_MIN if sigma_min is None else float(sigma_min)
    tail = [t_end]
  if not 0.0 < bottom < top:
    raise ValueError(f"sampling.grid={grid!r}: need eta_min < eta_max, got sigma_min={bottom}, "
                     f"sigma_max={top} (eta = sigma/alpha; eta(t_start)={float(eta_start)}, "
                     f"eta(t_end)={float(eta_end)})")
  ramp_size = num_steps + 1 - len(head) - len(tail)
  if ramp_size >= 2:
    i = np.arange(ramp_size) / (ramp_size - 1)
    if grid == "karras":
      etas = (top ** (1.0 / rho) + i * (bottom ** (1.0 / rho) - top ** (1.0 / rho))) ** rho
    else:
      etas = np.exp(np.log(top) + i * (np.log(bottom) - np.log(top)))
  elif ramp_size == 1:
    etas = np.array([top if tail else bottom])
  else:
    etas = np.zeros(0)
  ramp = np.asarray(schedule.eta_inv(np.asarray(etas, np.float64)), np.float64)
  return np.concatenate([head, ramp, tail]).astype(np.float64)


def diffusers_timesteps(grid, num_steps, num_train_steps=1000, steps_offset=0):
  """diffusers' DDPM timesteps k_0 > ... > k_{N-1} (rows of alphas_cumprod) for `timestep_spacing`.

  The expressions of DDIMScheduler.set_timesteps (leading) and DPMSolverMultistepScheduler /
  UniPCMultistepScheduler.set_timesteps (leading_multistep, linspace, trailing) in diffusers 0.42.
  """
  T, N = num_train_steps, num_steps
  if grid == "leading":
    k = np.arange(N)[::-1] * (T // N) + steps_offset
  elif grid == "leading_multistep":
    k = np.arange(1, N + 1)[::-1] * (T // (N + 1)) + steps_offset
  elif grid == "linspace":
    k = np.round(np.linspace(0, T - 1, N + 1))[::-1][:-1]
  else:
    k = np.round(np.arange(T, 0, -T / N)) - 1
  return k.astype(np.int64)


def _diffusers_grid(schedule, num_steps, grid, t_start, t_end, steps_offset):
  """t_i = (k_i + 1)/T of diffusers' timesteps, then t_end (see the module docstring)."""
  if not isinstance(schedule, schedules.VP):
    raise ValueError(f"sampling.grid={grid!r} is a grid of DDPM timesteps: it needs the VP schedule "
                     f"(objective.schedule='vp'), not {schedule.name!r}")
  if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
    raise ValueError(f"sampling.options.steps_offset={steps_offset!r}: must be an int >= 0")
  if t_start != 1.0:
    raise ValueError(f"sampling.t_start={t_start}: sampling.grid={grid!r} starts at its own first "
                     "timestep k_0 (t = (k_0 + 1)/T), as diffusers does; leave sampling.t_start = 1")
  T = schedule.num_steps
  k = diffusers_timesteps(grid, num_steps, T, int(steps_offset))
  if len(k) != num_steps or np.any(np.diff(k) >= 0) or k[-1] < 0 or k[0] > T - 1:
    raise ValueError(f"sampling.grid={grid!r} with sampling.num_steps={num_steps} and "
                     f"sampling.options.steps_offset={steps_offset}: diffusers' {len(k)} timesteps "
                     f"from k = {k[0]} to {k[-1]} are not {num_steps} distinct steps in [0, {T - 1}]")
  times = np.append((k + 1.0) / T, t_end)
  if not t_end < times[-2]:
    raise ValueError(f"sampling.t_end={t_end}: sampling.grid={grid!r} ends its steps at k = {k[-1]} "
                     f"(t = {times[-2]}), so t_end must be below it (0: alphabar = 1, diffusers' "
                     f"set_alpha_to_one=True / final_sigmas_type='zero'; 1/T: alphabar_0)")
  return times


def _check_num_steps(num_steps):
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"sampling.num_steps={num_steps!r}: must be an int >= 1 (static)")
  return int(num_steps)


def _check_times(schedule, times):
  if not np.all(np.diff(times) < 0):
    raise ValueError(f"sampling.grid: times must decrease strictly, got {times}")
  if times[0] > 1.0 or times[-1] < 0.0:
    raise ValueError(f"sampling.grid: times must lie in [0, 1], got {times}")
  if not float(schedule.sigma(np.float64(times[0]))) > 0.0:
    raise ValueError(f"sampling.t_start={times[0]}: sigma(t_start) = 0, nothing to sample")
  return times
