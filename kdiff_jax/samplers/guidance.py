"""Classifier-free guidance on the raw model output (Ho & Salimans 2022), with a guidance interval
(Kynkäänniemi et al. 2024).

G_w = G_null + w·(G_cond - G_null), one batched call of size 2B (conditional rows first), used
only for t inside `interval` = (t_lo, t_hi) (inclusive); outside it the conditional output.
w = 1 is the conditional model alone (one call of size B).
"""
import jax.numpy as jnp

from kdiff_jax import parameterization


def classifier_free(apply_fn, labels, *, null_label, scale, interval=(0.0, 1.0)):
  """model_fn(x_t, t) for the samplers, from apply_fn(x_t, t, y) -> raw output."""
  t_lo, t_hi = interval
  if not t_lo <= t_hi:
    raise ValueError(f"sampling.guidance_interval={interval}: need lo <= hi")
  if isinstance(scale, (int, float)) and scale == 1:
    return lambda x_t, t: apply_fn(x_t, t, labels)

  def model_fn(x_t, t):
    batch = x_t.shape[0]
    null = jnp.full_like(labels, null_label)
    output = apply_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                      jnp.concatenate([labels, null]))
    cond, uncond = output[:batch], output[batch:]
    guided = uncond + scale * (cond - uncond)
    inside = parameterization.broadcast_time((t >= t_lo) & (t <= t_hi), cond)
    return jnp.where(inside, guided, cond)

  return model_fn
