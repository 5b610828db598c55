"""PyTorch DiT, the twin of models/dit.py: facebookresearch/DiT's `DiT` (Peebles & Xie 2023)
with an optional second time embedder `s_embedder` (IMM's s or t - s), its adaLN-Zero block and
final layer (which JiT, torch_jit.py, builds with its own pieces, as models/jit.py does).

Module and parameter names are DiT's `models.py`, so an exported state_dict loads with
strict=True, and `DiT(learn_sigma=False)` has exactly the state_dict keys and shapes of DiT's own
class (`learn_sigma=True` those of the released DiT checkpoints).

kdiff_jax's conventions, shared by every torch twin (DiT, JiT in torch_jit.py, SongUNet in
torch_unet.py) where they differ from the originals' forward():
* forward(x, t, y, s=None): x is NCHW; t in [0, 1] with t = 0 data and t = 1 noise, and the time
  embedder sees time_scale·t (DiT: time_scale = 1000; JiT: time_scale = 1 and t = 1 - JiT's own
  t). The samplers (torch_sampling.py) give the network `Schedule.network_time(t)`: t, or on
  DDPM's vp schedule t - 1/1000, so that a DiT sees DDPM's step index k where
  alpha² = alphabar_k; s is the second time input (IMM's s or t - s) of a network built with
  second_time_embedder=True (DiT's embedder is `s_embedder`).
* y in [0, num_classes]; label num_classes is the null (classifier-free guidance) label, and the
  modules never drop labels themselves.
* Constructors use PyTorch's default initialisation: the weights come from an export. The fixed
  sin-cos `pos_embed` (a frozen parameter, in the state_dict as in DiT and JiT) is computed.

TVM's options (lumalabs/tvm `training/dit.py`), as models/dit.py: norm='rms_norm' (nn.RMSNorm
without affine in the blocks and the final layer), qk_norm (per-head RMSNorm of q and k with a
weight), modulation_norm (do_mod_norm: each adaLN chunk divided by its RMS), guidance_embedder
(`guidance_embedder`, a TimestepEmbedder of time_scale·beta added to c; forward(..., guidance=beta)).

torch and numpy only, no JAX: torch_load.py rebuilds a twin from an export.
"""
import torch
from torch import nn

from kdiff_jax.export.torch_layers import (Attention, LabelEmbedder, Mlp, PatchEmbed, RMSNorm,
                                           TimestepEmbedder, fixed_pos_embed, modulate,
                                           unpatchify)


def adaln(hidden_size: int, chunks: int) -> nn.Sequential:
  return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size))


def modulation_norm(modulation, chunks: int):
  """TVM's do_mod_norm: each of the `chunks` parts of [B, chunks·D] divided by its RMS (eps 1e-6)."""
  parts = modulation.float().unflatten(1, (chunks, -1))
  parts = parts * torch.rsqrt(parts.pow(2).mean(-1, keepdim=True) + 1e-6)
  return parts.flatten(1).to(modulation.dtype)


def block_norm(hidden_size: int, norm: str) -> nn.Module:
  """DiT's LayerNorm or TVM's RMSNorm, both without affine (eps 1e-6)."""
  if norm == "rms_norm":
    return nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False)
  if norm == "layer_norm":
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
  raise ValueError(f"norm={norm!r}: allowed values are ['layer_norm', 'rms_norm']")


class AdaLNBlock(nn.Module):
  """adaLN-Zero: x += gate·attn(modulate(norm1(x))); x += gate·mlp(modulate(norm2(x)))."""

  modulation_norm = False

  def forward(self, x, c, rope=None):
    modulation = self.adaLN_modulation(c)
    if self.modulation_norm:
      modulation = modulation_norm(modulation, 6)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
    x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
    return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiTBlock(AdaLNBlock):
  """DiT's block: LayerNorm without affine, timm Attention, GELU(tanh) Mlp (TVM's options aside)."""

  def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
               norm: str = "layer_norm", qk_norm: bool = False, modulation_norm: bool = False):
    super().__init__()
    self.norm1 = block_norm(hidden_size, norm)
    self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
    self.norm2 = block_norm(hidden_size, norm)
    self.modulation_norm = modulation_norm
    self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
    self.adaLN_modulation = adaln(hidden_size, 6)


class FinalLayer(nn.Module):
  """linear(modulate(norm_final(x), shift, scale)); norm_final: DiT's LayerNorm or JiT's RMSNorm."""

  def __init__(self, hidden_size: int, patch_size: int, out_channels: int,
               rms_norm: bool = False, norm: str = "layer_norm", modulation_norm: bool = False):
    super().__init__()
    self.norm_final = RMSNorm(hidden_size) if rms_norm else block_norm(hidden_size, norm)
    self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
    self.adaLN_modulation = adaln(hidden_size, 2)
    self.modulation_norm = modulation_norm

  def forward(self, x, c):
    modulation = self.adaLN_modulation(c)
    if self.modulation_norm:
      modulation = modulation_norm(modulation, 2)
    shift, scale = modulation.chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
  """facebookresearch/DiT's DiT, with an optional second time embedder `s_embedder` (IMM, TVM's
  h = t - s) and TVM's options (module docstring)."""

  def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
               hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
               mlp_ratio: float = 4.0, num_classes: int = 1000, learn_sigma: bool = False,
               second_time_embedder: bool = False, time_scale: float = 1000.0,
               norm: str = "layer_norm", qk_norm: bool = False, modulation_norm: bool = False,
               guidance_embedder: bool = False):
    super().__init__()
    self.in_channels = in_channels
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    self.patch_size = patch_size
    self.num_heads = num_heads
    self.time_scale = time_scale
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    # num_classes = 0: unconditional, no label table (models/dit.py)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes else None
    if second_time_embedder:
      self.s_embedder = TimestepEmbedder(hidden_size)
    self.second_time_embedder = second_time_embedder
    if guidance_embedder:
      self.guidance_embedder = TimestepEmbedder(hidden_size)
    self.has_guidance_embedder = guidance_embedder
    self.pos_embed = fixed_pos_embed(hidden_size, input_size // patch_size)
    self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, norm=norm,
                                          qk_norm=qk_norm, modulation_norm=modulation_norm)
                                 for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm=norm,
                                  modulation_norm=modulation_norm)

  def forward(self, x, t, y, s=None, guidance=None):
    """x [N, C, H, W], t [N] in [0, 1], y [N] labels, s [N] (second_time_embedder only),
    guidance [N] = beta (guidance_embedder only)."""
    if self.second_time_embedder != (s is not None):
      raise ValueError("pass s exactly when the model has a second time embedder "
                       f"(second_time_embedder={self.second_time_embedder})")
    if self.has_guidance_embedder != (guidance is not None):
      raise ValueError("pass guidance exactly when the model has a guidance embedder "
                       f"(guidance_embedder={self.has_guidance_embedder})")
    c = self.t_embedder(self.time_scale * t)
    if self.y_embedder is not None:
      c = c + self.y_embedder(y)
    if s is not None:
      c = c + self.s_embedder(self.time_scale * s)
    if guidance is not None:
      c = c + self.guidance_embedder(self.time_scale * guidance)
    x = self.x_embedder(x) + self.pos_embed
    for block in self.blocks:
      x = block(x, c)
    return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)
