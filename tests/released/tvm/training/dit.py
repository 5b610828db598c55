"""lumalabs/tvm `training/dit.py`, our stand-in: the same module path, class names, attributes,
submodules, state_dict keys and forward maths as the authors' DiT (PyTorch, float32, no JVP
kernels), at any size. Independent of kdiff_jax: the tests compare kdiff_jax's JAX DiT with it.

  c = t_embedder(t) + s_embedder(t - s) + guidance_embedder(beta) + y_embedder(label)
  x = x_embedder(x) + pos_embed; x = block(x, c) for each block; unpatchify(final_layer(x, c))

Embedders see the raw values (no 1000x); the timestep features are [cos, sin] in float64. Labels
arrive one-hot: argmax([one_hot, 1 - sum(one_hot)]) picks row num_classes (the null label) for an
all-zero row. Norms are RMSNorm without a weight (eps 1e-6); the attention's q and k have a
per-head RMSNorm with a weight (qk_norm); with do_mod_norm each of the adaLN output's chunks (6 in
a block, 2 in the final layer) is divided by its RMS (eps 1e-6, no weight).
Persistent (their source stored in a pickle): TimestepEmbedder, LabelEmbedder, DiTBlock,
FinalLayer, DiT and the named sizes; Attention, timm's PatchEmbed and Mlp by module path.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from timm.layers.mlp import Mlp
from timm.layers.patch_embed import PatchEmbed
from torch_utils import persistence


def rms_normalize(x, eps=1e-6):
  return x * torch.rsqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + eps)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


def normalize_chunks(modulation, chunks):
  shape = modulation.shape
  return rms_normalize(modulation.reshape(shape[0], chunks, -1)).reshape(shape)


class Attention(nn.Module):

  def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0.0,
               proj_drop=0.0):
    super().__init__()
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.scale = self.head_dim ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
    self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
    self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
    self.attn_drop = nn.Dropout(attn_drop)
    self.proj = nn.Linear(dim, dim)
    self.proj_drop = nn.Dropout(proj_drop)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k = self.q_norm(q), self.k_norm(k)
    weights = torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1)
    x = (weights @ v).transpose(1, 2).reshape(b, n, d)
    return self.proj_drop(self.proj(x))


@persistence.persistent_class
class TimestepEmbedder(nn.Module):

  def __init__(self, hidden_size, frequency_embedding_size=256):
    super().__init__()
    self.hidden_size = hidden_size
    self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                             nn.Linear(hidden_size, hidden_size))
    self.frequency_embedding_size = frequency_embedding_size

  def forward(self, t):
    half = self.frequency_embedding_size // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t[:, None].double() * freqs[None]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return self.mlp(features.to(t.dtype))


@persistence.persistent_class
class LabelEmbedder(nn.Module):

  def __init__(self, num_classes, hidden_size, dropout_prob):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)
    self.num_classes = num_classes
    self.dropout_prob = dropout_prob

  def forward(self, labels, train):
    return self.embedding_table(labels)


@persistence.persistent_class
class DiTBlock(nn.Module):

  def __init__(self, hidden_size, num_heads, temb_size, mlp_ratio=4.0, dropout=0,
               do_mod_norm=True, **block_kwargs):
    super().__init__()
    self.norm1 = nn.RMSNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.norm2 = nn.RMSNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, **block_kwargs)
    self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                   act_layer=lambda: nn.GELU(approximate="tanh"), drop=dropout)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(temb_size, 6 * hidden_size))
    self.do_mod_norm = do_mod_norm

  def forward(self, x, c):
    modulation = self.adaLN_modulation(c)
    if self.do_mod_norm:
      modulation = normalize_chunks(modulation, 6)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
    x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
    return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


@persistence.persistent_class
class FinalLayer(nn.Module):

  def __init__(self, hidden_size, patch_size, out_channels, do_mod_norm=True):
    super().__init__()
    self.norm_final = nn.RMSNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
    self.do_mod_norm = do_mod_norm

  def forward(self, x, c):
    modulation = self.adaLN_modulation(c)
    if self.do_mod_norm:
      modulation = normalize_chunks(modulation, 2)
    shift, scale = modulation.chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_2d(embed_dim, grid_size):
  """MAE's 2-D sin-cos table [grid², D]: the first half encodes the column, the second the row."""
  def one_axis(dim, positions):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  columns, rows = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                              np.arange(grid_size, dtype=np.float64))
  return np.concatenate([one_axis(embed_dim // 2, columns), one_axis(embed_dim // 2, rows)], 1)


@persistence.persistent_class
class DiT(nn.Module):

  def __init__(self, img_resolution, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
               num_heads=16, mlp_ratio=4.0, num_classes=1000, embedding_kwargs={}, temb_mult=1,
               dropout=0, qk_norm=True, learn_guidance=True, do_mod_norm=True,
               init_type="spectral", time_specinit=False, **kwargs):
    super().__init__()
    self.in_channels = in_channels
    self.out_channels = in_channels
    self.patch_size = patch_size
    self.num_heads = num_heads
    self.learn_guidance = learn_guidance
    temb_size = hidden_size * temb_mult
    self.s_embedder = TimestepEmbedder(temb_size, **embedding_kwargs)
    self.guidance_embedder = (TimestepEmbedder(temb_size, **embedding_kwargs)
                              if learn_guidance else None)
    self.x_embedder = PatchEmbed(img_resolution, patch_size, in_channels, hidden_size, bias=True)
    self.t_embedder = TimestepEmbedder(temb_size, **embedding_kwargs)
    self.y_embedder = LabelEmbedder(num_classes + 1, temb_size, 0.0)
    grid = img_resolution // patch_size
    self.pos_embed = nn.Parameter(
        torch.from_numpy(sincos_2d(hidden_size, grid)).float()[None], requires_grad=False)
    self.blocks = nn.ModuleList([
        DiTBlock(hidden_size, num_heads, temb_size, mlp_ratio=mlp_ratio, dropout=dropout,
                 qk_norm=qk_norm, do_mod_norm=do_mod_norm) for _ in range(depth)])
    self.init_type = init_type
    self.time_specinit = time_specinit
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels,
                                  do_mod_norm=do_mod_norm)

  def unpatchify(self, x):
    c, p = self.out_channels, self.patch_size
    h = w = int(x.shape[1] ** 0.5)
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
    return x.reshape(x.shape[0], c, h * p, w * p)

  def forward(self, x, noise_labels_t, noise_labels_ts, class_labels=None, guidance_scale=None):
    y = torch.cat([class_labels, 1 - class_labels.sum(dim=1, keepdim=True)], dim=1).argmax(dim=1)
    x = self.x_embedder(x) + self.pos_embed
    batch = lambda v: v.expand(x.shape[0]) if v.shape[0] == 1 else v
    c = self.t_embedder(batch(noise_labels_t))
    if noise_labels_ts is not None:
      c = c + self.s_embedder(batch(noise_labels_ts))
    if self.guidance_embedder is not None and guidance_scale is not None:
      c = c + self.guidance_embedder(batch(guidance_scale))
    c = c + self.y_embedder(y, self.training)
    for block in self.blocks:
      x = block(x, c)
    return self.unpatchify(self.final_layer(x, c))


@persistence.persistent_class
class DiT_XL_2_18h(DiT):

  def __init__(self, **kwargs):
    super().__init__(patch_size=2, hidden_size=1152, depth=28, num_heads=18, **kwargs)
