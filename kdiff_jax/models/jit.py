"""JiT, the pixel-space "Just image Transformer" of Li & He (2025), "Back to Basics: Let
Denoising Generative Models Denoise" (arXiv 2511.13720), in Flax NNX.

A port of LTH14/JiT `model_jit.py` (docs/objectives/kdiff.md, "JiT-B/16"), NHWC:

  c = t_embedder(time_scale·t) + y_embedder(y)               (JiT: raw t, time_scale = 1)
  x = x_embedder(x) + pos_embed        bottleneck patch embedding: conv p x p, C -> bottleneck
                                       (no bias), then 1 x 1 conv bottleneck -> hidden
  for block i:  at i = in_context_start prepend in_context_len class tokens y_emb + in_context_posemb
                x = block(x, c, rope)   adaLN-Zero, RMSNorm, per-head RMS qk-norm, 2-D RoPE
                                        (in-context tokens unrotated), SwiGLU MLP
  out = unpatchify(final_layer(x without the class tokens, c))

The blocks and the final layer are DiT's (models/dit.py) built with JiT's pieces
(layers.rms_norm, layers.SwiGLU, qk_norm), and the embedders, sin-cos positions and unpatchify
are shared (models/layers.py), so parameter paths are JiT's torch names after convert.torch_name
(e.g. blocks.0.attn.q_norm.weight, blocks.0.mlp.w12.weight, x_embedder.proj1.weight,
in_context_posemb). Differences from the torch module: t is the time of this codebase
(t = 0 data), i.e. 1 - JiT's t, so torch weights need t -> 1 - t at their input; JiT's
optional attention / projection dropout (middle blocks only) is not ported; the fixed pos_embed
is a numpy constant, not a buffer.
"""
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from kdiff_jax import parallel
from kdiff_jax.models import dit, layers

# name -> (depth, hidden_size, num_heads, bottleneck_dim, in_context_len, in_context_start).
# B, L, H are JiT's (model_jit.py JiT_B_16 ... JiT_H_32); T and XS are tiny CPU sizes.
SIZES = {
    "T": (2, 64, 2, 16, 4, 1),
    "XS": (4, 128, 4, 32, 8, 2),
    "B": (12, 768, 12, 128, 32, 4),
    "L": (24, 1024, 16, 128, 32, 8),
    "H": (32, 1280, 16, 256, 32, 10),
}
PATCH_SIZES = (1, 2, 4, 8, 16, 32)


class BottleneckPatchEmbed(nnx.Module):
  """proj2(proj1(x)): conv p x p stride p, C -> bottleneck (JiT: no bias; pMF's
  BottleneckPatchEmbedder: proj1_bias=True); 1 x 1 conv bottleneck -> D, with a bias.

  Both kernels xavier_uniform on torch's flattened [out, in·k·k] view, biases zero (JiT's
  initialize_weights; pMF's models/embedder.py alike). Returns [B, h·w, D] row-major tokens.
  """

  def __init__(self, patch_size: int, in_channels: int, bottleneck_dim: int, hidden_size: int, *,
               rngs: nnx.Rngs, dtype=jnp.float32, proj1_bias: bool = False):
    self.proj1 = nnx.Conv(
        in_channels, bottleneck_dim, kernel_size=(patch_size, patch_size),
        strides=(patch_size, patch_size), padding="VALID", use_bias=proj1_bias, dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=layers.partitioned(layers.conv_xavier_uniform, (None, None, None, None)),
        bias_init=layers.partitioned(layers.zeros, (None,)), rngs=rngs)
    self.proj2 = nnx.Conv(
        bottleneck_dim, hidden_size, kernel_size=(1, 1), use_bias=True, dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=layers.partitioned(layers.conv_xavier_uniform, (None, None, None, "embed")),
        bias_init=layers.partitioned(layers.zeros, ("embed",)), rngs=rngs)

  def __call__(self, x):
    return rearrange(self.proj2(self.proj1(x)), "b h w d -> b (h w) d")


class JiT(nnx.Module):
  """JiT: [B, H, W, C] x, [B] t in [0, 1], [B] labels (num_classes = null) -> [B, H, W, C] float32."""

  def __init__(self, *, input_size: int, in_channels: int, patch_size: int, hidden_size: int,
               depth: int, num_heads: int, mlp_ratio: float, num_classes: int,
               bottleneck_dim: int, in_context_len: int, in_context_start: int,
               time_scale: float = 1.0, dtype=jnp.float32, remat: str = "none",
               scan_blocks: bool = False, rngs: nnx.Rngs):
    if in_context_len and not 0 <= in_context_start < depth:
      raise ValueError(f"in_context_start={in_context_start} must be a block index < {depth}")
    dit.set_backbone_attributes(self, input_size=input_size, in_channels=in_channels,
                                patch_size=patch_size, hidden_size=hidden_size,
                                num_heads=num_heads, num_classes=num_classes,
                                time_scale=time_scale, dtype=dtype, remat=remat,
                                scan_blocks=scan_blocks)
    self.in_context_len = in_context_len
    self.in_context_start = in_context_start

    self.t_embedder = layers.TimestepEmbedder(hidden_size, rngs=rngs)
    self.y_embedder = layers.label_embedder(num_classes, hidden_size, rngs=rngs)  # None: unconditional
    self.x_embedder = BottleneckPatchEmbed(patch_size, in_channels, bottleneck_dim, hidden_size,
                                           dtype=dtype, rngs=rngs)
    if in_context_len:
      self.in_context_posemb = nnx.Param(layers.partitioned(
          nnx.initializers.normal(0.02), (None, None, "embed"))(
              rngs.params(), (1, in_context_len, hidden_size), jnp.float32))
    self.blocks = layers.blocks(
        lambda rngs: dit.DiTBlock(hidden_size, num_heads, mlp_ratio, norm=layers.rms_norm,
                                  mlp=layers.SwiGLU, qk_norm=True, dtype=dtype, rngs=rngs),
        depth, rngs, scan=scan_blocks)
    self.depth = depth
    self.final_layer = dit.FinalLayer(hidden_size, patch_size, self.out_channels,
                                      norm=layers.rms_norm, dtype=dtype, rngs=rngs)

  def pos_embed(self):
    """The fixed [T, D] 2-D sin-cos position embedding (a numpy constant, not a parameter)."""
    return layers.get_2d_sincos_pos_embed(self.hidden_size, self.grid_size)

  def rope(self, with_class_tokens: bool):
    """(cos, sin) for the image tokens, preceded by unrotated class tokens after in_context_start."""
    return layers.rope_2d(self.hidden_size // self.num_heads, self.grid_size,
                          self.in_context_len if with_class_tokens else 0)

  def __call__(self, x, t, y, s=None):
    if s is not None:
      raise ValueError("JiT has no second time embedder: s must be None")
    c = self.t_embedder(self.time_scale * jnp.asarray(t, jnp.float32))
    if self.y_embedder is not None:
      label_embedding = self.y_embedder(y)
      c = c + label_embedding
    c = parallel.constrain_batch(c)
    x = self.x_embedder(x.astype(self.dtype))
    x = x + jnp.asarray(self.pos_embed(), x.dtype)
    # Blocks before in_context_start see the image tokens, the rest the class tokens too.
    start = self.in_context_start if self.in_context_len else self.depth
    remat = dict(policy=self._remat_policy, use_remat=self._use_remat)
    x = layers.run_blocks(self.blocks, x, c, self.rope(False), stop=start, **remat)
    if self.in_context_len:
      if self.y_embedder is not None:
        tokens = label_embedding[:, None, :] + self.in_context_posemb[...]
      else:   # unconditional (no label table): the class tokens are in_context_posemb alone
        tokens = jnp.broadcast_to(self.in_context_posemb[...],
                                  (x.shape[0], self.in_context_len, self.hidden_size))
      x = jnp.concatenate([tokens.astype(x.dtype), x], axis=1)
      x = layers.run_blocks(self.blocks, x, c, self.rope(True), start=start, **remat)
    x = self.final_layer(x[:, self.in_context_len:], c)
    x = layers.unpatchify(x, self.patch_size, self.out_channels)
    return x.astype(jnp.float32)


def jit_from_config(config, dtype, rngs: nnx.Rngs) -> JiT:
  """A JiT from config.model.{size, patch_size, mlp_ratio, time_scale, remat} and
  config.data.{image_size, channels, num_classes} (JiT-B/16: size 'B', patch_size 16; checked
  by models.check), computing in `dtype`."""
  model = config.model
  depth, hidden_size, num_heads, bottleneck_dim, in_context_len, in_context_start = (
      SIZES[model.size])
  return JiT(input_size=config.data.image_size, in_channels=config.data.channels,
             patch_size=model.patch_size, hidden_size=hidden_size, depth=depth,
             num_heads=num_heads, mlp_ratio=model.mlp_ratio, num_classes=config.data.num_classes,
             bottleneck_dim=bottleneck_dim, in_context_len=in_context_len,
             in_context_start=in_context_start, time_scale=model.time_scale, dtype=dtype,
             remat=model.remat, scan_blocks=model.scan_blocks, rngs=rngs)
