"""Terminal Velocity Matching's few-step sampler (lumalabs/tvm `generate_images.py`;
docs/objectives/tvm.md).

On a decreasing grid t_0 = t_start > t_1 > ... > t_N = t_end (TVM: linspace(1, 0, N + 1), N = 1, 2
or 4), from x = noise at t_0, with the trained network F and classifier-free guidance cfg given to
it as beta = 1/cfg:

  x <- x + (t_{i+1} - t_i)·a·F(x, t_i, h = t_i - t_{i+1}, y, beta)          i = 0 .. N-1

i.e. the one-step map f_{t_{i+1}, t_i}; a = cfg when the network was trained with the output
scale (scale_output), else 1. N model calls: guidance is trained into F, no second pass. The
steps run through core.run_maps, the runner of every few-step map.
"""
import jax.numpy as jnp

from kdiff_jax.samplers import core

METHODS = ("tvm",)


def sample(network, noise, labels, *, times, cfg, scale_output):
  """x at times[-1] from noise = x at times[0].

  network(x, t, h, labels, beta) -> F, with t, h, beta: [B] vectors; times: the decreasing grid;
  cfg > 0 the guidance scale (beta = 1/cfg).
  """
  if not cfg > 0:
    raise ValueError(f"sampling.guidance_scale={cfg}: TVM feeds beta = 1/cfg, so cfg must be > 0")
  x = jnp.asarray(noise, jnp.float32)
  vector = lambda value: jnp.full((x.shape[0],), value, jnp.float32)
  beta = vector(1.0 / cfg)
  a = float(cfg) if scale_output else 1.0

  def step(x, c):
    """f_{s,t}(x) = x + (s - t)·a·F(x, t, t - s, y, beta)  (TVM's one-step map)."""
    return x + (c.s - c.t) * a * network(x, vector(c.t), vector(c.t - c.s), labels, beta)

  return core.run_maps(step, x, times)
