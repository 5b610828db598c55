"""PyTorch JiT, the twin of models/jit.py: LTH14/JiT's `JiT` (Li & He 2025), bottleneck patch
embedding, RMSNorm, per-head RMS qk-norm, 2-D RoPE, SwiGLU and in-context class tokens.

Module and parameter names are JiT's `model_jit.py`, so an exported state_dict loads with
strict=True. The adaLN-Zero block and final layer are DiT's (torch_dit.py) built with JiT's
pieces; the conventions (t = 0 data, so t = 1 - JiT's own t, time_scale = 1; the null label
num_classes) are those of torch_dit.py. torch and numpy only, no JAX.
"""
import torch
from torch import nn

from kdiff_jax.export.torch_dit import AdaLNBlock, FinalLayer, adaln
from kdiff_jax.export.torch_layers import (Attention, LabelEmbedder, RMSNorm, SwiGLUFFN,
                                           TimestepEmbedder, VisionRotaryEmbeddingFast,
                                           fixed_pos_embed, unpatchify)


class BottleneckPatchEmbed(nn.Module):
  """JiT: Conv2d p x p stride p to the bottleneck (no bias; pMF's has one: proj1_bias=True), then
  a 1 x 1 Conv2d to the width."""

  def __init__(self, patch_size: int, in_channels: int, bottleneck_dim: int, hidden_size: int,
               proj1_bias: bool = False):
    super().__init__()
    self.proj1 = nn.Conv2d(in_channels, bottleneck_dim, patch_size, stride=patch_size,
                           bias=proj1_bias)
    self.proj2 = nn.Conv2d(bottleneck_dim, hidden_size, 1)

  def forward(self, x):
    return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)


class JiTBlock(AdaLNBlock):
  """JiT's block: RMSNorm, RMS qk-norm and RoPE in the attention, SwiGLU MLP."""

  def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
    super().__init__()
    self.norm1 = RMSNorm(hidden_size)
    self.attn = Attention(hidden_size, num_heads, qk_norm=True)
    self.norm2 = RMSNorm(hidden_size)
    self.mlp = SwiGLUFFN(hidden_size, int(hidden_size * mlp_ratio))
    self.adaLN_modulation = adaln(hidden_size, 6)


class JiT(nn.Module):
  """LTH14/JiT's JiT: bottleneck patches, RoPE, in-context class tokens from in_context_start."""

  def __init__(self, input_size: int = 256, patch_size: int = 16, in_channels: int = 3,
               hidden_size: int = 768, depth: int = 12, num_heads: int = 12,
               mlp_ratio: float = 4.0, num_classes: int = 1000, bottleneck_dim: int = 128,
               in_context_len: int = 32, in_context_start: int = 4, time_scale: float = 1.0):
    super().__init__()
    self.in_channels = self.out_channels = in_channels
    self.patch_size = patch_size
    self.num_heads = num_heads
    self.in_context_len = in_context_len
    self.in_context_start = in_context_start
    self.time_scale = time_scale
    self.t_embedder = TimestepEmbedder(hidden_size)
    # num_classes = 0: unconditional, no label table (models/jit.py)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes else None
    self.x_embedder = BottleneckPatchEmbed(patch_size, in_channels, bottleneck_dim, hidden_size)
    grid_size = input_size // patch_size
    self.pos_embed = fixed_pos_embed(hidden_size, grid_size)
    if in_context_len:
      self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size))
    head_dim = hidden_size // num_heads
    self.feat_rope = VisionRotaryEmbeddingFast(head_dim, grid_size)
    self.feat_rope_incontext = VisionRotaryEmbeddingFast(head_dim, grid_size, in_context_len)
    self.blocks = nn.ModuleList([JiTBlock(hidden_size, num_heads, mlp_ratio)
                                 for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, rms_norm=True)

  def forward(self, x, t, y, s=None):
    """x [N, C, H, W], t [N] in [0, 1] (t = 0 data), y [N] labels."""
    if s is not None:
      raise ValueError("JiT has no second time embedder: s must be None")
    c = self.t_embedder(self.time_scale * t)
    y_emb = None if self.y_embedder is None else self.y_embedder(y)
    if y_emb is not None:
      c = c + y_emb
    x = self.x_embedder(x) + self.pos_embed
    for i, block in enumerate(self.blocks):
      if self.in_context_len and i == self.in_context_start:
        tokens = self.in_context_posemb.expand(x.shape[0], -1, -1)   # unconditional: alone
        if y_emb is not None:
          tokens = y_emb.unsqueeze(1).repeat(1, self.in_context_len, 1) + self.in_context_posemb
        x = torch.cat([tokens, x], dim=1)
      with_tokens = self.in_context_len and i >= self.in_context_start
      x = block(x, c, self.feat_rope_incontext if with_tokens else self.feat_rope)
    x = self.final_layer(x[:, self.in_context_len:], c)
    return unpatchify(x, self.patch_size, self.out_channels)
