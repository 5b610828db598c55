"""PyTorch SongUNet, the twin of models/unet.py: NVlabs/edm's DDPM++ U-Net (Song et al. 2021,
EDM `training/networks.py`) with lumalabs/imm's s-embedding (Zhou, Ermon, Song 2025).

Its state_dict is EDM's / IMM's (EDM's parameter names and persistent `resample_filter`
buffers; IMMPrecond's with the 'model.' prefix removed), so a released IMM network loads with
strict=True. Conventions (t = 0 data, the embeddings see time_scale·t with time_scale = 1000 as
IMMPrecond's c_noise, the null label num_classes) are those of torch_dit.py. torch and numpy
only, no JAX.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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


def group_norm(channels: int) -> nn.GroupNorm:
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
    self.norm0 = group_norm(in_channels)
    self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down)
    self.affine = nn.Linear(emb_channels, out_channels)
    self.norm1 = group_norm(out_channels)
    self.conv1 = Conv2d(out_channels, out_channels, 3)
    self.skip = (Conv2d(in_channels, out_channels, 1, up=up, down=down)
                 if out_channels != in_channels or up or down else None)
    self.attention = attention
    if attention:
      self.norm2 = group_norm(out_channels)
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
    self.dec[f"{input_size}x{input_size}_aux_norm"] = group_norm(cout)
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
