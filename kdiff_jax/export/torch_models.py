"""PyTorch modules and samplers for kdiff_jax exports: DiT (one or two time embedders), JiT and
SongUNet (EDM's DDPM++ with IMM's s-embedding; EDM's state_dict names, NVlabs/edm networks.py).

Self-contained: torch, numpy and safetensors only, no JAX (copy this file, or import it from the
repository without JAX installed). Module and parameter names are those of facebookresearch/DiT
`models.py` (Peebles & Xie 2023) and LTH14/JiT `model_jit.py` (Li & He 2025), so an exported
state_dict loads with strict=True, and `DiT(learn_sigma=False)` has exactly the state_dict keys
and shapes of DiT's own class (`learn_sigma=True` those of the released DiT checkpoints).

kdiff_jax's conventions, where they differ from the originals' forward():
* forward(x, t, y, s=None): x is NCHW; t in [0, 1] with t = 0 data and t = 1 noise, and the time
  embedder sees time_scale·t (DiT: time_scale = 1000; JiT: time_scale = 1 and t = 1 - JiT's own
  t). The samplers give the network `Schedule.network_time(t)`: t, or on DDPM's vp schedule
  t - 1/1000, so that a DiT sees DDPM's step index k where alpha² = alphabar_k; s is the second time input (IMM's s or t - s) of a
  DiT built with second_time_embedder=True (its embedder is `s_embedder`).
* y in [0, num_classes]; label num_classes is the null (classifier-free guidance) label, and the
  modules never drop labels themselves.
* Constructors use PyTorch's default initialisation: the weights come from an export. The fixed
  sin-cos `pos_embed` (a frozen parameter, in the state_dict as in DiT and JiT) is computed.

Sampling without JAX: `load(json_path)` rebuilds the model from an export's JSON and loads its
.safetensors; `sample(model, meta, noise, labels)` runs the exported sampler: Euler / Heun on the
probability-flow velocity for flow and k-Diff models, IMM's pushforward for IMM models.
"""
import json
import math
import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FREQUENCY_EMBEDDING_SIZE = 256


# --- position embeddings ------------------------------------------------------------------------

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


def _fixed_pos_embed(hidden_size: int, grid_size: int) -> nn.Parameter:
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


# --- layers -------------------------------------------------------------------------------------

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


class BottleneckPatchEmbed(nn.Module):
  """JiT: Conv2d p x p stride p to the bottleneck (no bias), then a 1 x 1 Conv2d to the width."""

  def __init__(self, patch_size: int, in_channels: int, bottleneck_dim: int, hidden_size: int):
    super().__init__()
    self.proj1 = nn.Conv2d(in_channels, bottleneck_dim, patch_size, stride=patch_size,
                           bias=False)
    self.proj2 = nn.Conv2d(bottleneck_dim, hidden_size, 1)

  def forward(self, x):
    return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)


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


def _adaln(hidden_size: int, chunks: int) -> nn.Sequential:
  return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size))


class AdaLNBlock(nn.Module):
  """adaLN-Zero: x += gate·attn(modulate(norm1(x))); x += gate·mlp(modulate(norm2(x)))."""

  def forward(self, x, c, rope=None):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        self.adaLN_modulation(c).chunk(6, dim=1))
    x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
    return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiTBlock(AdaLNBlock):
  """DiT's block: LayerNorm without affine, timm Attention, GELU(tanh) Mlp."""

  def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(hidden_size, num_heads)
    self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
    self.adaLN_modulation = _adaln(hidden_size, 6)


class JiTBlock(AdaLNBlock):
  """JiT's block: RMSNorm, RMS qk-norm and RoPE in the attention, SwiGLU MLP."""

  def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
    super().__init__()
    self.norm1 = RMSNorm(hidden_size)
    self.attn = Attention(hidden_size, num_heads, qk_norm=True)
    self.norm2 = RMSNorm(hidden_size)
    self.mlp = SwiGLUFFN(hidden_size, int(hidden_size * mlp_ratio))
    self.adaLN_modulation = _adaln(hidden_size, 6)


class FinalLayer(nn.Module):
  """linear(modulate(norm_final(x), shift, scale)); norm_final: DiT's LayerNorm or JiT's RMSNorm."""

  def __init__(self, hidden_size: int, patch_size: int, out_channels: int,
               rms_norm: bool = False):
    super().__init__()
    self.norm_final = (RMSNorm(hidden_size) if rms_norm else
                       nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
    self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
    self.adaLN_modulation = _adaln(hidden_size, 2)

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x, patch_size: int, channels: int):
  """DiT: [N, h·w, p·p·C] tokens, read in (p, q, c) order -> [N, C, h·p, w·p]."""
  h = w = int(x.shape[1] ** 0.5)
  x = x.reshape(x.shape[0], h, w, patch_size, patch_size, channels)
  x = torch.einsum("nhwpqc->nchpwq", x)
  return x.reshape(x.shape[0], channels, h * patch_size, w * patch_size)


# --- models -------------------------------------------------------------------------------------

class DiT(nn.Module):
  """facebookresearch/DiT's DiT, with an optional second time embedder `s_embedder` (IMM)."""

  def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
               hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
               mlp_ratio: float = 4.0, num_classes: int = 1000, learn_sigma: bool = False,
               second_time_embedder: bool = False, time_scale: float = 1000.0):
    super().__init__()
    self.in_channels = in_channels
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    self.patch_size = patch_size
    self.num_heads = num_heads
    self.time_scale = time_scale
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size)
    if second_time_embedder:
      self.s_embedder = TimestepEmbedder(hidden_size)
    self.second_time_embedder = second_time_embedder
    self.pos_embed = _fixed_pos_embed(hidden_size, input_size // patch_size)
    self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio)
                                 for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

  def forward(self, x, t, y, s=None):
    """x [N, C, H, W], t [N] in [0, 1], y [N] labels, s [N] (second_time_embedder only)."""
    if self.second_time_embedder != (s is not None):
      raise ValueError("pass s exactly when the model has a second time embedder "
                       f"(second_time_embedder={self.second_time_embedder})")
    c = self.t_embedder(self.time_scale * t) + self.y_embedder(y)
    if s is not None:
      c = c + self.s_embedder(self.time_scale * s)
    x = self.x_embedder(x) + self.pos_embed
    for block in self.blocks:
      x = block(x, c)
    return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)


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
    self.y_embedder = LabelEmbedder(num_classes, hidden_size)
    self.x_embedder = BottleneckPatchEmbed(patch_size, in_channels, bottleneck_dim, hidden_size)
    grid_size = input_size // patch_size
    self.pos_embed = _fixed_pos_embed(hidden_size, grid_size)
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
    y_emb = self.y_embedder(y)
    c = self.t_embedder(self.time_scale * t) + y_emb
    x = self.x_embedder(x) + self.pos_embed
    for i, block in enumerate(self.blocks):
      if self.in_context_len and i == self.in_context_start:
        tokens = y_emb.unsqueeze(1).repeat(1, self.in_context_len, 1) + self.in_context_posemb
        x = torch.cat([tokens, x], dim=1)
      with_tokens = self.in_context_len and i >= self.in_context_start
      x = block(x, c, self.feat_rope_incontext if with_tokens else self.feat_rope)
    x = self.final_layer(x[:, self.in_context_len:], c)
    return unpatchify(x, self.patch_size, self.out_channels)


# --- SongUNet: EDM's DDPM++ U-Net with IMM's s-embedding ----------------------------------------

SKIP_SCALE = math.sqrt(0.5)


def positional_embedding(c, num_channels: int):
  """EDM's PositionalEmbedding(endpoint=True), halves swapped as SongUNet does: [sin(c·f),
  cos(c·f)], f_i = 10000^(-i/(C/2 - 1)) (f in float64 rounded to float32; IMM: float64)."""
  half = num_channels // 2
  freqs = torch.from_numpy((1.0 / 10000) ** (np.arange(half, dtype=np.float64) / (half - 1)))
  args = c.float().ger(freqs.float().to(c.device))
  return torch.cat([args.sin(), args.cos()], dim=1)


class Conv2d(nn.Conv2d):
  """EDM's Conv2d (non-fused): 2x up- or down-sampling by the per-channel filter f ⊗ f / (Σf)²
  (the persistent buffer `resample_filter`, as in EDM), then a k x k conv with padding k // 2."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int, up: bool = False,
               down: bool = False, resample_filter=(1, 1)):
    super().__init__(in_channels, out_channels, kernel, padding=kernel // 2)
    self.up, self.down = up, down
    if up or down:
      f = torch.as_tensor(resample_filter, dtype=torch.float32)
      self.register_buffer("resample_filter", f.outer(f)[None, None] / f.sum().square())

  def forward(self, x):
    if self.up or self.down:
      f, channels = self.resample_filter.to(x.dtype), x.shape[1]
      pad = (f.shape[-1] - 1) // 2
      if self.up:
        x = F.conv_transpose2d(x, (4 * f).tile([channels, 1, 1, 1]), groups=channels, stride=2,
                               padding=pad)
      else:
        x = F.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=pad)
    return super().forward(x)


def _group_norm(channels: int) -> nn.GroupNorm:
  """EDM's GroupNorm: min(32, C // 4) groups, eps 1e-6."""
  return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)


class UNetBlock(nn.Module):
  """EDM's UNetBlock as DDPM++ builds it (one attention head, adaptive_scale=False,
  resample_proj=True, skip scale √½)."""

  def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
               down: bool = False, attention: bool = False, dropout: float = 0.0):
    super().__init__()
    self.in_channels, self.out_channels = in_channels, out_channels
    self.dropout = dropout
    self.norm0 = _group_norm(in_channels)
    self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down)
    self.affine = nn.Linear(emb_channels, out_channels)
    self.norm1 = _group_norm(out_channels)
    self.conv1 = Conv2d(out_channels, out_channels, 3)
    self.skip = (Conv2d(in_channels, out_channels, 1, up=up, down=down)
                 if out_channels != in_channels or up or down else None)
    self.attention = attention
    if attention:
      self.norm2 = _group_norm(out_channels)
      self.qkv = Conv2d(out_channels, 3 * out_channels, 1)
      self.proj = Conv2d(out_channels, out_channels, 1)

  def forward(self, x, emb):
    h = self.conv0(F.silu(self.norm0(x)))
    h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
    h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
    x = (h + (x if self.skip is None else self.skip(x))) * SKIP_SCALE
    if self.attention:
      channels = x.shape[1]
      q, k, v = self.qkv(self.norm2(x)).reshape(x.shape[0], channels, 3, -1).unbind(2)
      w = torch.einsum("ncq,nck->nqk", q.float(), (k / math.sqrt(channels)).float())
      a = torch.einsum("nqk,nck->ncq", w.softmax(dim=2).to(q.dtype), v)
      x = (self.proj(a.reshape(x.shape)) + x) * SKIP_SCALE
    return x


class SongUNet(nn.Module):
  """NVlabs/edm's SongUNet as DDPM++ (positional embedding, standard encoder and decoder, filter
  [1, 1]) with lumalabs/imm's s-embedding (map_layer0_s, map_layer1_s): its state_dict is EDM's /
  IMM's (IMMPrecond's with the 'model.' prefix removed). num_classes = 0: unconditional (EDM's
  label_dim = 0, labels ignored); else map_label on the one-hot label, the null label num_classes
  one-hot to zero."""

  def __init__(self, input_size: int = 32, in_channels: int = 3, num_classes: int = 0,
               model_channels: int = 128, channel_mult=(2, 2, 2), num_blocks: int = 4,
               attn_resolutions=(16,), dropout: float = 0.0, second_time_embedder: bool = False,
               time_scale: float = 1000.0):
    super().__init__()
    self.num_classes = num_classes
    self.noise_channels = model_channels
    self.time_scale = time_scale
    emb_channels = 4 * model_channels
    block = lambda cin, cout, **kwargs: UNetBlock(cin, cout, emb_channels, dropout=dropout,
                                                  **kwargs)
    self.map_label = nn.Linear(num_classes, model_channels) if num_classes else None
    self.map_layer0 = nn.Linear(model_channels, emb_channels)
    self.map_layer1 = nn.Linear(emb_channels, emb_channels)
    self.second_time_embedder = second_time_embedder
    if second_time_embedder:
      self.map_layer0_s = nn.Linear(model_channels, emb_channels)
      self.map_layer1_s = nn.Linear(emb_channels, emb_channels)

    self.enc = nn.ModuleDict()
    for level, mult in enumerate(channel_mult):
      res = input_size >> level
      if level == 0:
        self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels, model_channels, 3)
        cout = model_channels
      else:
        self.enc[f"{res}x{res}_down"] = block(cout, cout, down=True)
      for idx in range(num_blocks):
        self.enc[f"{res}x{res}_block{idx}"] = block(cout, model_channels * mult,
                                                    attention=res in attn_resolutions)
        cout = model_channels * mult
    skips = [layer.out_channels for layer in self.enc.values()]
    self.dec = nn.ModuleDict()
    for level, mult in reversed(list(enumerate(channel_mult))):
      res = input_size >> level
      if level == len(channel_mult) - 1:
        self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
        self.dec[f"{res}x{res}_in1"] = block(cout, cout)
      else:
        self.dec[f"{res}x{res}_up"] = block(cout, cout, up=True)
      for idx in range(num_blocks + 1):
        self.dec[f"{res}x{res}_block{idx}"] = block(
            cout + skips.pop(), model_channels * mult,
            attention=idx == num_blocks and res in attn_resolutions)
        cout = model_channels * mult
    self.dec[f"{input_size}x{input_size}_aux_norm"] = _group_norm(cout)
    self.dec[f"{input_size}x{input_size}_aux_conv"] = Conv2d(cout, in_channels, 3)

  def forward(self, x, t, y, s=None):
    """x [N, C, H, W], t [N] in [0, 1], y [N] labels (ignored if num_classes = 0), s [N]
    (second_time_embedder only)."""
    if self.second_time_embedder != (s is not None):
      raise ValueError("pass s exactly when the model has a second time embedder "
                       f"(second_time_embedder={self.second_time_embedder})")
    emb = positional_embedding(self.time_scale * t, self.noise_channels)
    if self.map_label is not None:
      one_hot = F.one_hot(y, self.num_classes + 1)[:, :self.num_classes].float()
      emb = emb + self.map_label(one_hot * math.sqrt(self.num_classes))
    emb = self.map_layer1(F.silu(self.map_layer0(emb)))
    if s is not None:
      emb_s = positional_embedding(self.time_scale * s, self.noise_channels)
      emb = emb + self.map_layer1_s(F.silu(self.map_layer0_s(emb_s)))
    emb = F.silu(emb)
    skips = []
    for layer in self.enc.values():
      x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
      skips.append(x)
    for name, layer in self.dec.items():
      if name.endswith("_aux_norm"):
        x = F.silu(layer(x))
      elif name.endswith("_aux_conv"):
        x = layer(x)
      else:
        if x.shape[1] != layer.in_channels:
          x = torch.cat([x, skips.pop()], dim=1)
        x = layer(x, emb)
    return x


ARCHITECTURES = {"dit": DiT, "jit": JiT, "unet": SongUNet}


def build(model_meta: dict) -> nn.Module:
  """The module of an export's meta['model'] ({'name': 'dit' | 'jit' | 'unet', **constructor
  kwargs})."""
  kwargs = dict(model_meta)
  name = kwargs.pop("name")
  if name not in ARCHITECTURES:
    raise ValueError(f"model name {name!r}: torch_models builds {sorted(ARCHITECTURES)}")
  return ARCHITECTURES[name](**kwargs)


def load(json_path: str, device="cpu"):
  """(model in eval mode, meta) from an export's JSON and the .safetensors named in it."""
  from safetensors.torch import load_file
  with open(json_path) as f:
    meta = json.load(f)
  model = build(meta["model"])
  weights = os.path.join(os.path.dirname(json_path), meta["files"]["safetensors"])
  model.load_state_dict(load_file(weights, device=str(device)), strict=True)
  return model.to(device).eval(), meta


# --- schedules and parameterizations (kdiff_jax's conventions: t = 0 data, t = 1 noise) ---------

class Schedule:
  """x_t = alpha(t)·x + sigma(t)·n at host float times (float64), as kdiff_jax.schedules.

  rectified_flow: alpha = 1 - t, sigma = t.  cosine: alpha = cos(πt/2), sigma = sin(πt/2).
  vp: DDPM's linear beta table (1e-4 .. 0.02, 1000 steps), log(alpha) linear between the knots
  t_i = i/1000, sigma = sqrt(1 - alpha²).
  """

  NAMES = ("rectified_flow", "cosine", "vp")

  def __init__(self, name: str):
    if name not in self.NAMES:
      raise ValueError(f"schedule {name!r}: allowed values are {list(self.NAMES)}")
    self.name = name
    if name == "vp":
      betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
      self._log_alpha = np.concatenate([[0.0], 0.5 * np.cumsum(np.log1p(-betas))])
      self._knots = np.arange(1001, dtype=np.float64) / 1000

  def alpha(self, t: float) -> float:
    if self.name == "rectified_flow":
      return 1.0 - t
    if self.name == "cosine":
      return math.cos(0.5 * math.pi * t)
    return math.exp(float(np.interp(t, self._knots, self._log_alpha)))

  def sigma(self, t: float) -> float:
    if self.name == "rectified_flow":
      return t
    if self.name == "cosine":
      return math.sin(0.5 * math.pi * t)
    return math.sqrt(-math.expm1(2.0 * math.log(self.alpha(t))))

  def alpha_dot(self, t: float) -> float:
    if self.name == "rectified_flow":
      return -1.0
    if self.name == "cosine":
      return -0.5 * math.pi * math.sin(0.5 * math.pi * t)
    i = min(max(int(math.floor(t * 1000)), 0), 999)
    return self.alpha(t) * (self._log_alpha[i + 1] - self._log_alpha[i]) * 1000

  def sigma_dot(self, t: float) -> float:
    if self.name == "rectified_flow":
      return 1.0
    if self.name == "cosine":
      return 0.5 * math.pi * math.cos(0.5 * math.pi * t)
    return -self.alpha(t) * self.alpha_dot(t) / self.sigma(t)

  def network_time(self, t: float) -> float:
    """The time the network is given at t: t, or on vp t - 1/1000, so that a DiT's embedder
    (time_scale 1000) sees DDPM's step index k where alpha² = alphabar_k."""
    return t - 1e-3 if self.name == "vp" else t


def to_x_eps(prediction: str, output, x_t, t: float, schedule: Schedule, *, k=None,
             noise_std: float = 1.0, min_divisor: float = 0.0):
  """(x_hat, n_hat) from a network output in `prediction` (kdiff_jax.parameterization.to_x_eps).

  eps: x = (x_t - sigma·eps)/alpha.  x: n = (x_t - alpha·x)/sigma.
  v: x = (alpha·x_t - sigma·v)/(alpha² + sigma²),  n = (sigma·x_t + alpha·v)/(alpha² + sigma²).
  velocity: x = (sigma_dot·x_t - sigma·u)/det, n = (alpha·u - alpha_dot·x_t)/det,
            det = alpha·sigma_dot - sigma·alpha_dot.
  score: n = -sigma·noise_std²·s, x = (x_t - sigma·n)/alpha.
  u_k: x = ((1-k)·x_t + sigma·u)/Delta, n = (k·x_t - alpha·u)/Delta,
       Delta = alpha·(1-k) + sigma·k.
  Divisors that vanish at an end are clamped from below by min_divisor (if > 0).
  """
  alpha, sigma = schedule.alpha(t), schedule.sigma(t)
  clamp = lambda d: max(d, min_divisor) if min_divisor else d
  if prediction in ("eps", "score"):
    n_hat = output if prediction == "eps" else -sigma * noise_std**2 * output
    return (x_t - sigma * n_hat) / clamp(alpha), n_hat
  if prediction == "x":
    return output, (x_t - alpha * output) / clamp(sigma)
  if prediction == "v":
    norm = alpha**2 + sigma**2
    return (alpha * x_t - sigma * output) / norm, (sigma * x_t + alpha * output) / norm
  if prediction == "velocity":
    alpha_dot, sigma_dot = schedule.alpha_dot(t), schedule.sigma_dot(t)
    det = clamp(alpha * sigma_dot - sigma * alpha_dot)
    return (sigma_dot * x_t - sigma * output) / det, (alpha * output - alpha_dot * x_t) / det
  if prediction == "u_k":
    delta = clamp(alpha * (1.0 - k) + sigma * k)
    return ((1.0 - k) * x_t + sigma * output) / delta, (k * x_t - alpha * output) / delta
  raise ValueError(f"prediction {prediction!r}: allowed values are "
                   "['eps', 'x', 'v', 'velocity', 'score', 'u_k']")


# --- samplers -----------------------------------------------------------------------------------

def _guided(model, labels, schedule: Schedule, *, guidance_scale: float, guidance_interval,
            null_label: int):
  """net(x, t, s=None) -> G: the model at the schedule's network_time(t), with classifier-free
  guidance G_null + w·(G_cond - G_null) for t inside guidance_interval (inclusive), the
  conditional output elsewhere; t and s are host floats."""
  t_lo, t_hi = guidance_interval

  def net(x, t, s=None):
    batch = x.shape[0]
    time = lambda value: torch.full((batch,), value, dtype=torch.float32, device=x.device)
    t_vec = time(schedule.network_time(t))
    # The second time input: s, or a [B] tensor already (IMM's stride t - s in float32).
    s_vec = s if s is None or torch.is_tensor(s) else time(s)
    if guidance_scale == 1 or not t_lo <= t <= t_hi:
      return model(x, t_vec, labels, s_vec)
    both = lambda v: None if v is None else torch.cat([v, v])
    null = torch.full_like(labels, null_label)
    out = model(both(x), both(t_vec), torch.cat([labels, null]), both(s_vec))
    cond, uncond = out[:batch], out[batch:]
    return uncond + guidance_scale * (cond - uncond)

  return net


def uniform_times(num_steps: int, t_start: float = 1.0, t_end: float = 0.0) -> list[float]:
  return np.linspace(t_start, t_end, num_steps + 1).tolist()


@torch.no_grad()
def sample_ode(model, noise, labels, times, *, method: str = "heun",
               schedule: str = "rectified_flow", prediction: str = "velocity",
               k: float | Callable[[float], float] | None = None, noise_std: float = 1.0,
               min_divisor: float = 0.0, guidance_scale: float = 1.0,
               guidance_interval=(0.0, 1.0), null_label: int):
  """Flow Euler / Heun in t on the velocity v = alpha_dot·x_hat + sigma_dot·n_hat.

  From x = noise at times[0] (already scaled by noise_std) down the decreasing `times`:
  Euler x_s = x_t + (s - t)·v(x_t, t); Heun adds the trapezoid correction with v at the Euler
  point, and its last step is Euler (no model call at times[-1]). k: k-Diff's k, or k(t).
  """
  if method not in ("euler", "heun"):
    raise ValueError(f"method {method!r}: torch_models samples ODEs with 'euler' or 'heun'")
  schedule = Schedule(schedule)
  net = _guided(model, labels, schedule, guidance_scale=guidance_scale,
                guidance_interval=guidance_interval, null_label=null_label)

  def velocity(x, t):
    k_t = k(t) if callable(k) else k
    x_hat, n_hat = to_x_eps(prediction, net(x, t), x, t, schedule, k=k_t, noise_std=noise_std,
                            min_divisor=min_divisor)
    return schedule.alpha_dot(t) * x_hat + schedule.sigma_dot(t) * n_hat

  x = noise.float()
  steps = list(zip(times[:-1], times[1:]))
  for i, (t, s) in enumerate(steps):
    v = velocity(x, t)
    if method == "heun" and i < len(steps) - 1:
      x = x + (s - t) * 0.5 * (v + velocity(x + (s - t) * v, s))
    else:
      x = x + (s - t) * v
  return x


def imm_map_coefficients(f_type: str, s: float, t: float, schedule: Schedule, sigma_d: float):
  """(c_skip, c_out) of IMM's one-step map f_{s,t}(x_t) = c_skip·x_t + c_out·G (App. C.6).

  euler_fm: (1, -(t - s)·sigma_d).  simple_edm: ((alpha_t·alpha_s + sigma_t·sigma_s)/(alpha_t² +
  sigma_t²), -(alpha_s·sigma_t - alpha_t·sigma_s)/sqrt(alpha_t² + sigma_t²)·sigma_d).
  identity (DDIM with G as x): (sigma_s/sigma_t, alpha_s - alpha_t·sigma_s/sigma_t).
  """
  alpha_s, sigma_s = schedule.alpha(s), schedule.sigma(s)
  alpha_t, sigma_t = schedule.alpha(t), schedule.sigma(t)
  if f_type == "euler_fm":
    return 1.0, -(t - s) * sigma_d
  if f_type == "simple_edm":
    norm = alpha_t**2 + sigma_t**2
    return ((alpha_t * alpha_s + sigma_t * sigma_s) / norm,
            -(alpha_s * sigma_t - alpha_t * sigma_s) / math.sqrt(norm) * sigma_d)
  if f_type == "identity":
    return sigma_s / sigma_t, alpha_s - alpha_t * sigma_s / sigma_t
  raise ValueError(f"f_type {f_type!r}: allowed values are ['euler_fm', 'simple_edm', 'identity']")


@torch.no_grad()
def sample_imm(model, noise, labels, times, *, f_type: str = "euler_fm",
               schedule: str = "rectified_flow", sigma_d: float = 0.5,
               time_conditioning: str = "identity", guidance_scale: float = 1.0,
               guidance_interval=(0.0, 1.0), null_label: int):
  """IMM pushforward (Zhou, Ermon, Song 2025): x <- f_{t_{i+1}, t_i}(x) down the decreasing times.

  x starts at noise ~ sigma_d·N(0, I) at times[0]; the network sees c_in(t)·x_t with
  c_in = 1/(sigma_d·sqrt(alpha_t² + sigma_t²)), t, and s (time_conditioning 'identity') or t - s
  ('stride'); guidance acts on the raw output G before the map.
  """
  if time_conditioning not in ("identity", "stride"):
    raise ValueError(f"time_conditioning {time_conditioning!r}: 'identity' or 'stride'")
  schedule = Schedule(schedule)
  net = _guided(model, labels, schedule, guidance_scale=guidance_scale,
                guidance_interval=guidance_interval, null_label=null_label)
  x = noise.float()
  for t, s in zip(times[:-1], times[1:]):
    c_in = 1.0 / (sigma_d * math.sqrt(schedule.alpha(t)**2 + schedule.sigma(t)**2))
    if time_conditioning == "stride":  # t - s in float32, as the JAX sampler computes it
      as32 = lambda v: torch.full((x.shape[0],), v, dtype=torch.float32, device=x.device)
      second_time = as32(t) - as32(s)
    else:
      second_time = s
    output = net(c_in * x, t, second_time)
    c_skip, c_out = imm_map_coefficients(f_type, s, t, schedule, sigma_d)
    x = c_skip * x + c_out * output
  return x


def kdiff_k(objective_meta: dict, weights: str):
  """k-Diff's k for `weights` ('model' or 'ema'): a float, or k(t) = sigmoid((1-t)·logit(k_0) +
  t·logit(k_1)) for a time-dependent k (exported as [k_0, k_1]); None for other objectives."""
  kdiff = objective_meta.get("kdiff")
  if kdiff is None:
    return None
  k = kdiff["k"][weights]
  if not kdiff["time_dependent"]:
    return k
  logit_data, logit_noise = (math.log(k_end / (1.0 - k_end)) for k_end in k)
  return lambda t: 1.0 / (1.0 + math.exp(-((1.0 - t) * logit_data + t * logit_noise)))


def sample(model, meta: dict, noise, labels, *, method: str | None = None,
           num_steps: int | None = None, guidance_scale: float | None = None,
           weights: str | None = None):
  """Samples from an exported model with the export's sampler settings (meta['sampling']).

  noise: [N, C, H, W] at t_start, already scaled by meta['objective']['noise_std']; labels [N].
  method: 'pushforward' (IMM) or 'euler' / 'heun' (flow, k-Diff); num_steps: a uniform grid in t
  from t_start to t_end instead of the exported grid; weights: which weights `model` holds,
  'ema' or 'model' (k-Diff's learned k differs), default that of the .safetensors.
  """
  objective, sampling = meta["objective"], meta["sampling"]
  method = method or sampling["method"]
  times = (sampling["times"] if num_steps is None else
           uniform_times(num_steps, sampling["t_start"], sampling["t_end"]))
  guidance = dict(
      guidance_scale=sampling["guidance_scale"] if guidance_scale is None else guidance_scale,
      guidance_interval=tuple(sampling["guidance_interval"]),
      null_label=meta["model"]["num_classes"])
  if objective["name"] == "imm":
    if method != "pushforward":
      raise ValueError(f"method {method!r}: torch_models samples IMM models with 'pushforward'")
    return sample_imm(model, noise, labels, times, f_type=objective["imm"]["f_type"],
                      schedule=objective["schedule"], sigma_d=objective["noise_std"],
                      time_conditioning=objective["imm"]["time_conditioning"], **guidance)
  return sample_ode(model, noise, labels, times, method=method, schedule=objective["schedule"],
                    prediction=objective["prediction"],
                    k=kdiff_k(objective, weights or meta["weights"]["safetensors"]),
                    noise_std=objective["noise_std"], min_divisor=objective["min_divisor"],
                    **guidance)
