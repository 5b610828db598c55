"""A time- and class-conditioned residual MLP for flat inputs x [B, D] (2-D toy data).

Same call as the DiT, model(x, t, y, s=None, guidance=None), with DiT's embedders
(layers.TimestepEmbedder, layers.LabelEmbedder, an optional second time embedder for IMM's s or
MeanFlow's and TVM's h, an optional guidance embedder for TVM's beta = 1/cfg):

  c = t_embedder(time_scale·t) + y_embedder(y) [+ s_embedder(time_scale·s)]
      [+ guidance_embedder(time_scale·beta)]
  h = x_proj(x);  h = h + fc2(silu(fc1(silu(h)) + cond(c))) for each block;  out = out_proj(silu(h))

out_proj is zero-initialised, so the network starts at output 0 (as DiT's final layer).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from kdiff_jax.models import layers


class MLPBlock(nnx.Module):
  """h + fc2(silu(fc1(silu(h)) + cond(c)))."""

  def __init__(self, width: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.fc1 = layers.linear(width, width, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.cond = layers.linear(width, width, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = layers.linear(width, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, h, c):
    return h + self.fc2(jax.nn.silu(self.fc1(jax.nn.silu(h)) + self.cond(c)))


class MLP(nnx.Module):
  """Residual MLP: [B, D] x, [B] t in [0, 1], [B] labels (num_classes = null) -> [B, D]."""

  def __init__(self, *, features: int, width: int, depth: int, num_classes: int,
               second_time_embedder: bool, time_scale: float = 1000.0,
               guidance_embedder: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
    self.time_scale = float(time_scale)
    self.t_embedder = layers.TimestepEmbedder(width, rngs=rngs)
    self.y_embedder = layers.label_embedder(num_classes, width, rngs=rngs)  # None: unconditional
    self.s_embedder = layers.TimestepEmbedder(width, rngs=rngs) if second_time_embedder else None
    self.guidance_embedder = (layers.TimestepEmbedder(width, rngs=rngs)
                              if guidance_embedder else None)
    self.x_proj = layers.linear(features, width, (None, "embed"), dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([MLPBlock(width, dtype=dtype, rngs=rngs) for _ in range(depth)])
    self.out_proj = layers.linear(width, features, ("embed", None), kernel_init=layers.zeros,
                                  dtype=dtype, rngs=rngs)

  def __call__(self, x, t, y, s=None, guidance=None):
    if (self.s_embedder is None) != (s is None):
      raise ValueError(f"MLP built with second_time_embedder={self.s_embedder is not None} "
                       f"but called with s={'None' if s is None else 'an array'} "
                       "(model.second_time_embedder)")
    if (self.guidance_embedder is None) != (guidance is None):
      raise ValueError(f"MLP built with guidance_embedder={self.guidance_embedder is not None} "
                       f"but called with guidance={'None' if guidance is None else 'an array'} "
                       "(model.guidance_embedder)")
    c = self.t_embedder(self.time_scale * jnp.asarray(t, jnp.float32))
    if self.y_embedder is not None:
      c = c + self.y_embedder(y)
    if s is not None:
      c = c + self.s_embedder(self.time_scale * jnp.asarray(s, jnp.float32))
    if guidance is not None:
      c = c + self.guidance_embedder(self.time_scale * jnp.asarray(guidance, jnp.float32))
    h = self.x_proj(x)
    for block in self.blocks:
      h = block(h, c)
    return self.out_proj(jax.nn.silu(h)).astype(jnp.float32)


def mlp_from_config(config, dtype, rngs: nnx.Rngs) -> MLP:
  """An MLP for points of data.channels coordinates, sized by model.mlp_width / model.mlp_depth,
  computing in `dtype`."""
  model = config.model
  return MLP(features=config.data.channels, width=model.mlp_width, depth=model.mlp_depth,
             num_classes=config.data.num_classes,
             second_time_embedder=model.second_time_embedder, time_scale=model.time_scale,
             guidance_embedder=model.guidance_embedder, dtype=dtype, rngs=rngs)
