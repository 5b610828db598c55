"""MeanFlow's few-step sampler (Geng et al. 2025, Alg. 2; docs/objectives/meanflow.md).

On a decreasing grid t_0 = t_start > t_1 > ... > t_N = t_end (MeanFlow: linspace(1, 0, N + 1)),
from z = noise at t_0, with the trained average velocity u:

  z <- z - (t_i - t_{i+1})·u(z, t_i, h = t_i - t_{i+1}, y)          i = 0 .. N-1

N model calls; N = 1 is one evaluation from noise to data. Guidance is trained into u, so there
is no second pass. The steps run through core.run_maps, the runner of every few-step map.
"""
import jax.numpy as jnp

from kdiff_jax.samplers import core

METHODS = ("mean_flow",)


def sample(average_velocity, noise, labels, *, times):
  """z at times[-1] from noise = z at times[0].

  average_velocity(z, t, r, labels) -> u, with t, r: [B] vectors; times: the decreasing grid.
  """
  z = jnp.asarray(noise, jnp.float32)
  vector = lambda value: jnp.full((z.shape[0],), value, jnp.float32)

  def step(z, c):
    """z_r = z_t - (t - r)·u(z_t, t, r)  (Geng et al. 2025, Eq. 12 and Alg. 2)."""
    u = average_velocity(z, vector(c.t), vector(c.s), labels)
    return z - (c.t - c.s) * u

  return core.run_maps(step, z, times)
