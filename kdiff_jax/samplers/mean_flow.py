"""MeanFlow's few-step sampler (Geng et al. 2025, Alg. 2; docs/objectives/meanflow.md).

On a decreasing grid t_0 = t_start > t_1 > ... > t_N = t_end (MeanFlow: linspace(1, 0, N + 1)),
from z = noise at t_0, with the trained average velocity u:

  z <- z - (t_i - t_{i+1})·u(z, t_i, h = t_i - t_{i+1}, y)          i = 0 .. N-1

N model calls; N = 1 is one evaluation from noise to data. Guidance is trained into u, so there
is no second pass. The steps run as one lax.scan over the float64 grid, so `jax.jit` of `sample`
compiles one step body however many steps there are.
"""
import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("mean_flow",)


def sample(average_velocity, noise, labels, *, times):
  """z at times[-1] from noise = z at times[0].

  average_velocity(z, t, r, labels) -> u, with t, r: [B] vectors; times: the decreasing grid.
  """
  times = np.asarray(times, np.float64)
  if not np.all(np.diff(times) < 0):
    raise ValueError(f"the time grid must decrease, got {times.tolist()}")
  z = jnp.asarray(noise, jnp.float32)
  batch = z.shape[0]

  def step(z, t_r):
    t, r = (jnp.full((batch,), value, jnp.float32) for value in t_r)
    u = average_velocity(z, t, r, labels)
    return z - (t_r[0] - t_r[1]) * u, None

  pairs = jnp.asarray(np.stack([times[:-1], times[1:]], axis=1), jnp.float32)
  z, _ = jax.lax.scan(step, z, pairs)
  return z
