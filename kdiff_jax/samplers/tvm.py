"""Terminal Velocity Matching's few-step sampler (lumalabs/tvm `generate_images.py`;
docs/objectives/tvm.md).

On a decreasing grid t_0 = t_start > t_1 > ... > t_N = t_end (TVM: linspace(1, 0, N + 1), N = 1, 2
or 4), from x = noise at t_0, with the trained network F and classifier-free guidance cfg given to
it as beta = 1/cfg:

  x <- x + (t_{i+1} - t_i)·a·F(x, t_i, h = t_i - t_{i+1}, y, beta)          i = 0 .. N-1

i.e. the one-step map f_{t_{i+1}, t_i}; a = cfg when the network was trained with the output
scale (scale_output), else 1. N model calls: guidance is trained into F, no second pass. The
steps run as one lax.scan over the float64 grid, so `jax.jit` of `sample` compiles one step body.
"""
import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("tvm",)


def sample(network, noise, labels, *, times, cfg, scale_output):
  """x at times[-1] from noise = x at times[0].

  network(x, t, h, labels, beta) -> F, with t, h, beta: [B] vectors; times: the decreasing grid;
  cfg > 0 the guidance scale (beta = 1/cfg).
  """
  times = np.asarray(times, np.float64)
  if not np.all(np.diff(times) < 0):
    raise ValueError(f"the time grid must decrease, got {times.tolist()}")
  if not cfg > 0:
    raise ValueError(f"sampling.guidance_scale={cfg}: TVM feeds beta = 1/cfg, so cfg must be > 0")
  x = jnp.asarray(noise, jnp.float32)
  batch = x.shape[0]
  beta = jnp.full((batch,), 1.0 / cfg, jnp.float32)
  a = float(cfg) if scale_output else 1.0

  def step(x, t_s):
    t, s = t_s[0], t_s[1]
    vector = lambda value: jnp.full((batch,), value, jnp.float32)
    F = network(x, vector(t), vector(t - s), labels, beta)
    return x + (s - t) * a * F, None

  pairs = jnp.asarray(np.stack([times[:-1], times[1:]], axis=1), jnp.float32)
  x, _ = jax.lax.scan(step, x, pairs)
  return x
