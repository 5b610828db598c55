"""PyTorch layers shared by the torch DiT (torch_dit.py) and JiT (torch_jit.py), the twin of
models/layers.py: sin-cos positions, JiT's 2-D RoPE, the time and label embedders, patch
embedding, RMSNorm, attention, the MLPs and unpatchify.

Module and parameter names are those of facebookresearch/DiT `models.py` (Peebles & Xie 2023),
timm's Attention / Mlp and LTH14/JiT `model_jit.py` (Li & He 2025), so the state_dict of a
network built from them is the original's. torch and numpy only, no JAX.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FREQUENCY_EMBEDDING_SIZE = 256


# --- position embeddings --------------------------------------------------------------------------

def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  """MAE / DiT: [sin(pos·omega), cos(pos·omega)], omega_d = 10000^(-d/(embed_dim/2))."""
  omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
  out = np.einsum("m,d->md", pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
  """MAE / DiT: [grid_size², embed_dim]; the first half encodes the column, the second the row."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w goes first
  emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
  emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
  return np.concatenate([emb_h, emb_w], axis=1)


def fixed_pos_embed(hidden_size: int, grid_size: int) -> nn.Parameter:
  table = torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, grid_size)).float()[None]
  return nn.Parameter(table, requires_grad=False)


class VisionRotaryEmbeddingFast(nn.Module):
  """JiT's 2-D RoPE (EVA-02): channel pairs of a head's first half rotate by row·f_i, of the
  second half by col·f_i, f_i = theta^(-2i/(head_dim/2)); num_cls_token leading tokens are not
  rotated. The tables are non-persistent buffers (not in the state_dict, as in JiT)."""

  def __init__(self, head_dim: int, grid_size: int, num_cls_token: int = 0,
               theta: float = 10000.0):
    super().__init__()
    dim = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[:dim // 2].float() / dim)
    freqs = torch.repeat_interleave(torch.arange(grid_size).float()[:, None] * freqs, 2, dim=-1)
    freqs = torch.cat([freqs[:, None, :].expand(grid_size, grid_size, dim),
                       freqs[None, :, :].expand(grid_size, grid_size, dim)], dim=-1)
    freqs = freqs.reshape(grid_size * grid_size, head_dim)
    self.register_buffer("freqs_cos", torch.cat(
        [torch.ones(num_cls_token, head_dim), freqs.cos()]), persistent=False)
    self.register_buffer("freqs_sin", torch.cat(
        [torch.zeros(num_cls_token, head_dim), freqs.sin()]), persistent=False)

  def forward(self, x):
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * self.freqs_cos + rotated * self.freqs_sin


# --- layers ---------------------------------------------------------------------------------------

def modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
  """DiT: sinusoidal [cos, sin] features of the (scaled) time -> Linear -> SiLU -> Linear."""

  def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                             nn.Linear(hidden_size, hidden_size))
    self.frequency_embedding_size = frequency_embedding_size

  @staticmethod
  def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None].to(t.device)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
      embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding

  def forward(self, t):
    return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
  """DiT: a table of num_classes + 1 rows; row num_classes is the null label."""

  def __init__(self, num_classes: int, hidden_size: int):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
    self.num_classes = num_classes

  def forward(self, labels):
    return self.embedding_table(labels)


class PatchEmbed(nn.Module):
  """timm PatchEmbed as DiT uses it: Conv2d(kernel = stride = patch), tokens row-major."""

  def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
    super().__init__()
    self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class RMSNorm(nn.Module):
  """JiT's RMSNorm: x / sqrt(mean(x²) + eps) · weight, statistics in float32."""

  def __init__(self, hidden_size: int, eps: float = 1e-6):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(hidden_size))
    self.eps = eps

  def forward(self, x):
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return (self.weight * normed).to(x.dtype)


class Attention(nn.Module):
  """timm Attention (qkv_bias=True); JiT adds per-head RMS q/k norms and RoPE."""

  def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
    super().__init__()
    self.num_heads = num_heads
    head_dim = dim // num_heads
    if qk_norm:
      self.q_norm = RMSNorm(head_dim)
      self.k_norm = RMSNorm(head_dim)
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)
    self.qk_norm = qk_norm

  def forward(self, x, rope=None):
    batch, tokens, dim = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, heads, T, head_dim] each
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = rope(q), rope(k)
    x = F.scaled_dot_product_attention(q, k, v)
    return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
  """timm Mlp as DiT uses it: fc1 -> GELU(tanh) -> fc2."""

  def __init__(self, in_features: int, hidden_features: int):
    super().__init__()
    self.fc1 = nn.Linear(in_features, hidden_features)
    self.act = nn.GELU(approximate="tanh")
    self.fc2 = nn.Linear(hidden_features, in_features)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
  """JiT: w3(silu(x1)·x2), (x1, x2) = w12(x).chunk(2), hidden int(hidden_dim·2/3)."""

  def __init__(self, dim: int, hidden_dim: int):
    super().__init__()
    hidden_dim = int(hidden_dim * 2 / 3)
    self.w12 = nn.Linear(dim, 2 * hidden_dim)
    self.w3 = nn.Linear(hidden_dim, dim)

  def forward(self, x):
    x1, x2 = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(x1) * x2)


def unpatchify(x, patch_size: int, channels: int):
  """DiT: [N, h·w, p·p·C] tokens, read in (p, q, c) order -> [N, C, h·p, w·p]."""
  h = w = int(x.shape[1] ** 0.5)
  x = x.reshape(x.shape[0], h, w, patch_size, patch_size, channels)
  x = torch.einsum("nhwpqc->nchpwq", x)
  return x.reshape(x.shape[0], channels, h * patch_size, w * patch_size)
