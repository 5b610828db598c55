"""PyTorch iMF DiT, the twin of models/imf_dit.py (improved MeanFlow's in-context DiT, after the
facts of Lyy-iiis/imeanflow `models/imfDiT.py`); torch_sampling.sample_mean_flow samples it
(ω and the interval as inputs).

Module and parameter names are the official ones (h_embedder, omega_embedder,
cfg_t_start_embedder, cfg_t_end_embedder, y_embedder, class_tokens ... time_tokens,
shared_blocks, u_heads, v_heads, u_final_layer, v_final_layer; blocks: norm1, attn.{q,k,v,out}_proj,
attn.{q,k}_norm, norm2, mlp.{w1,w3,w2}, attn_scale, mlp_scale), so kdiff_jax's export
(`export/convert.imf_dit_to_torch`) loads with strict=True.

forward(x, t, y, s=None, guidance=None, interval=None, v_head=False): x NCHW; t is accepted and
not used (only h = s = t - r conditions the network); guidance ω ≥ 1 enters as 1 - 1/ω;
interval = (t_min, t_max); each a float or an [N] tensor, defaults h = 0, ω = 1, (0, 1). y in
[0, num_classes], num_classes the null label. Returns u, or (u, v) with v_head=True.

torch and numpy only, no JAX (torch_load.py rebuilds the twin from an export).
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdiff_jax.export.torch_layers import (LabelEmbedder, PatchEmbed, RMSNorm, TimestepEmbedder,
                                           unpatchify)

TOKEN_GROUPS = (("class_tokens", 8), ("omega_tokens", 4), ("t_min_tokens", 2),
                ("t_max_tokens", 2), ("time_tokens", 4))


def rope_1d(head_dim: int, seq_len: int, theta: float = 10000.0):
  """(cos, sin) [seq_len, head_dim]: pair (2i, 2i+1) at position p rotates by p·theta^(-2i/d)."""
  freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  angle = np.repeat(np.arange(seq_len, dtype=np.float64)[:, None] * freqs, 2, axis=1)
  return (torch.from_numpy(np.cos(angle).astype(np.float32)),
          torch.from_numpy(np.sin(angle).astype(np.float32)))


def apply_rope(x, cos, sin):
  """x·cos + rotate_half(x)·sin, rotate_half(x)_(2i, 2i+1) = (-x_(2i+1), x_(2i)); x [N, T, h, d]."""
  pairs = x.unflatten(-1, (-1, 2))
  rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
  return x * cos[:, None, :].to(x.dtype) + rotated * sin[:, None, :].to(x.dtype)


class RoPEAttention(nn.Module):
  """q, k, v, out projections without bias; per-head RMS q/k norms, then 1-D RoPE."""

  def __init__(self, hidden_size: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    head_dim = hidden_size // num_heads
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
        nn.Linear(hidden_size, hidden_size, bias=False) for _ in range(4))
    self.q_norm = RMSNorm(head_dim)
    self.k_norm = RMSNorm(head_dim)

  def forward(self, x, cos, sin):
    batch, tokens, dim = x.shape
    heads = lambda y: y.reshape(batch, tokens, self.num_heads, dim // self.num_heads)
    q = apply_rope(self.q_norm(heads(self.q_proj(x))), cos, sin)
    k = apply_rope(self.k_norm(heads(self.k_proj(x))), cos, sin)
    v = heads(self.v_proj(x))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class SwiGLUMlp(nn.Module):
  """w2(silu(w1 x)·w3 x), no biases."""

  def __init__(self, hidden_size: int, mlp_hidden: int):
    super().__init__()
    self.w1 = nn.Linear(hidden_size, mlp_hidden, bias=False)
    self.w3 = nn.Linear(hidden_size, mlp_hidden, bias=False)
    self.w2 = nn.Linear(mlp_hidden, hidden_size, bias=False)

  def forward(self, x):
    return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ImfBlock(nn.Module):
  """x += attn_scale·attn(norm1 x); x += mlp_scale·mlp(norm2 x)."""

  def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int):
    super().__init__()
    self.norm1 = RMSNorm(hidden_size)
    self.attn = RoPEAttention(hidden_size, num_heads)
    self.norm2 = RMSNorm(hidden_size)
    self.mlp = SwiGLUMlp(hidden_size, mlp_hidden)
    self.attn_scale = nn.Parameter(torch.zeros(hidden_size))
    self.mlp_scale = nn.Parameter(torch.zeros(hidden_size))

  def forward(self, x, cos, sin):
    x = x + self.attn(self.norm1(x), cos, sin) * self.attn_scale
    return x + self.mlp(self.norm2(x)) * self.mlp_scale


class FinalLayer(nn.Module):
  """linear(RMSNorm(x))."""

  def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
    super().__init__()
    self.norm = RMSNorm(hidden_size)
    self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

  def forward(self, x):
    return self.linear(self.norm(x))


class ImfDiT(nn.Module):
  """iMF's in-context DiT: condition tokens [class | ω | t_min | t_max | h] + patches, a shared
  trunk of depth - head_depth blocks, then u and v heads of head_depth blocks each."""

  def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
               hidden_size: int = 768, depth: int = 12, num_heads: int = 12,
               head_depth: int = 8, mlp_ratio: float = 4.0, num_classes: int = 1000):
    super().__init__()
    self.in_channels = self.out_channels = in_channels
    self.patch_size = patch_size
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.h_embedder = TimestepEmbedder(hidden_size)
    self.omega_embedder = TimestepEmbedder(hidden_size)
    self.cfg_t_start_embedder = TimestepEmbedder(hidden_size)
    self.cfg_t_end_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size)
    for name, count in TOKEN_GROUPS:
      setattr(self, name, nn.Parameter(torch.zeros(count, hidden_size)))
    self.num_prefix_tokens = sum(count for _, count in TOKEN_GROUPS)
    mlp_hidden = int(int(hidden_size * mlp_ratio) * 2 / 3)
    block = lambda: ImfBlock(hidden_size, num_heads, mlp_hidden)
    self.shared_blocks = nn.ModuleList([block() for _ in range(depth - head_depth)])
    self.u_heads = nn.ModuleList([block() for _ in range(head_depth)])
    self.v_heads = nn.ModuleList([block() for _ in range(head_depth)])
    self.u_final_layer = FinalLayer(hidden_size, patch_size, in_channels)
    self.v_final_layer = FinalLayer(hidden_size, patch_size, in_channels)
    seq_len = self.num_prefix_tokens + (input_size // patch_size) ** 2
    cos, sin = rope_1d(hidden_size // num_heads, seq_len)
    self.register_buffer("rope_cos", cos, persistent=False)
    self.register_buffer("rope_sin", sin, persistent=False)

  def sequence(self, prefix, patches):
    """The blocks' input: condition tokens, then patch tokens (torch_pmf_dit adds positions)."""
    return torch.cat([prefix, patches], dim=1)

  def forward(self, x, t, y, s=None, guidance=None, interval=None, v_head: bool = False):
    del t  # only h = t - r conditions the network
    batch = x.shape[0]
    row = lambda value, default: torch.as_tensor(
        default if value is None else value, dtype=torch.float32,
        device=x.device).reshape(-1).expand(batch)
    t_min, t_max = (None, None) if interval is None else interval
    omega = row(guidance, 1.0)
    embeddings = {
        "class_tokens": self.y_embedder(y),
        "omega_tokens": self.omega_embedder(1.0 - 1.0 / omega),
        "t_min_tokens": self.cfg_t_start_embedder(row(t_min, 0.0)),
        "t_max_tokens": self.cfg_t_end_embedder(row(t_max, 1.0)),
        "time_tokens": self.h_embedder(row(s, 0.0)),
    }
    prefix = torch.cat([getattr(self, name)[None] + embeddings[name][:, None]
                        for name, _ in TOKEN_GROUPS], dim=1)
    tokens = self.sequence(prefix, self.x_embedder(x))
    for block in self.shared_blocks:
      tokens = block(tokens, self.rope_cos, self.rope_sin)

    def head(blocks, final_layer):
      out = tokens
      for block in blocks:
        out = block(out, self.rope_cos, self.rope_sin)
      return unpatchify(final_layer(out[:, self.num_prefix_tokens:]), self.patch_size,
                        self.out_channels)

    u = head(self.u_heads, self.u_final_layer)
    return (u, head(self.v_heads, self.v_final_layer)) if v_head else u
