"""IMM's samplers (Zhou, Ermon, Song 2025, Sec. 4.3, App. C; docs/objectives/imm.md): pushforward and restart.

On a decreasing grid t_0 = t_start > t_1 > ... > t_N = t_end, from x = noise ~ N(0, sigma_d^2 I)
at t_0, with the one-step map f_{s,t} of the trained network:

  pushforward  x <- f_{t_{i+1}, t_i}(x)                                         i = 0 .. N-1
  restart      x~ = f_{t_N, t_i}(x);  x <- alpha_{t_{i+1}}·x~ + sigma_{t_{i+1}}·eps',
               eps' ~ N(0, sigma_d^2 I), for i < N-1; the last step returns f_{t_N, t_{N-1}}(x).

Both take N model calls (2N rows with classifier-free guidance). Guidance acts on the raw
network output G before the map: G_w = G_null + w·(G_cond - G_null) (guidance.classifier_free,
null label = num_classes).

Their step contract is their own: `step(x, c, key, step_map) -> x` with `step_map(x, s, t) =
f_{s,t}(x)` (scalar s, t) and `c` the step's float64 record (core.MapStep, `RestartStep`);
`plan` builds a samplers.core plan of them and `sample` runs it with core.scan_plan (one lax.scan
per phase), so `jax.jit` of `sample` compiles one step body however many steps there are.

Any grid of grids.time_grid: 'uniform_t' linspace(t_start, t_end, N+1) is the paper's ImageNet
grid, 'cifar' its CIFAR-10 grids, 'karras' EDM's rho-ramp in eta = sigma/alpha.
"""
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from kdiff_jax.samplers import core, grids, guidance

METHODS = ("pushforward", "restart")


class RestartStep(NamedTuple):
  s: float            # t_N: every restart step maps to the end
  t: float            # t_i
  alpha: float        # alpha_{t_{i+1}}
  sigma_noise: float  # sigma_{t_{i+1}}·sigma_d


def _pushforward_step(x, c, key, step_map):
  """x <- f_{s,t}(x) (c: a core.MapStep)."""
  return step_map(x, c.s, c.t)


def _restart_step(x, c, key, step_map):
  """x <- alpha_{t_{i+1}}·f_{t_N,t_i}(x) + sigma_{t_{i+1}}·sigma_d·z, z ~ N(0, I)."""
  x = step_map(x, c.s, c.t)
  return c.alpha * x + core.gaussian(key, x, c.sigma_noise)


def plan(schedule, times, method, noise_std=1.0):
  """The core.Plan of `method` on the float64 grid `times` (coefficients from the schedule)."""
  times = np.asarray(times, np.float64)
  steps = len(times) - 1
  if method == "pushforward":
    rows = [(_pushforward_step, c, False) for c in core.map_steps(times)]
  elif method == "restart":
    rows = [(_restart_step, RestartStep(s=times[-1], t=times[i],
                                        alpha=float(schedule.alpha(times[i + 1])),
                                        sigma_noise=float(schedule.sigma(times[i + 1])) * noise_std),
             True)
            for i in range(steps - 1)]
    rows.append((_pushforward_step, core.MapStep(t=times[-2], s=times[-1]), False))
  else:
    raise ValueError(f"sampling.method={method!r}: allowed values are {list(METHODS)}")
  return core.steps_to_plan(rows)


def sample(raw_fn, map_fn, noise, labels, *, schedule, method, num_steps, grid, t_start, t_end,
           null_label, guidance_scale=1.0, guidance_interval=(0.0, 1.0), noise_std=1.0, key=None,
           scan=True, **grid_options):
  """Samples at t_end from noise (x at t_start, already scaled by noise_std = sigma_d).

  raw_fn(x_t, s, t, labels) -> network output G; map_fn(x_t, G, s, t) -> f_{s,t}(x_t); s, t are
  [B] vectors. method: METHODS; grid: a grids.GRIDS name or explicit times; grid_options: its
  options (rho, shift). key: needed by 'restart' (one split per step). scan=False runs a Python
  loop (same math).
  """
  times = grids.time_grid(schedule, num_steps, grid, t_start=t_start, t_end=t_end, **grid_options)
  x = jnp.asarray(noise, jnp.float32)

  def step_map(x_t, s, t):
    s_vec = jnp.full((x_t.shape[0],), s, x_t.dtype)
    t_vec = jnp.full((x_t.shape[0],), t, x_t.dtype)
    # CFG doubles the batch (conditional rows first): s follows the rows it is given.
    raw_at_s = lambda x_, t_, y_: raw_fn(x_, jnp.full(t_.shape, s, t_.dtype), t_, y_)
    model_fn = guidance.classifier_free(raw_at_s, labels, null_label=null_label,
                                        scale=guidance_scale, interval=guidance_interval)
    return map_fn(x_t, model_fn(x_t, t_vec).astype(x_t.dtype), s_vec, t_vec)

  return core.scan_plan(plan(schedule, times, method, noise_std), x, key, x.dtype,
                        lambda step, x, c, key_i: step(x, c, key_i, step_map), scan=scan,
                        method=method)
