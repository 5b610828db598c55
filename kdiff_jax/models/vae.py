"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) in Flax NNX, NHWC, float32 throughout.

Module names mirror diffusers' `AutoencoderKL` (encoder.down_blocks.0.resnets.1.conv2,
decoder.mid_block.attentions.0.to_q, quant_conv, …), so the published diffusers-format weights
(`stabilityai/sd-vae-ft-ema`, `sd-vae-ft-mse`: `diffusion_pytorch_model.safetensors`) load by a
rename and a transpose (export/weight_files.py: `vae(path)` reads a local file or diffusers
directory; nothing is downloaded). The architecture comes from the `config.json` beside the weights
(what `AutoencoderKL.save_pretrained` writes) or, without one, is the SD-VAE's: 4 latent
channels, downsampling factor 8, block_out_channels (128, 256, 512, 512), 2 layers per block,
32 norm groups.

  graphdef, params, arch = weight_files.vae("/weights/sd-vae-ft-ema")
  model = nnx.merge(graphdef, params)
  mean, std = model.encode(x)           # x: [B, 256, 256, 3] in [-1, 1] -> [B, 32, 32, 4] each
  x_hat = model.decode(mean + std * n)  # the posterior sample z, unscaled (no 0.18215)
"""
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

# Full float32 matmuls and convolutions on every backend (TPUs default to bfloat16 passes).
HIGHEST = jax.lax.Precision.HIGHEST
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# AutoencoderKL constructor arguments this module implements, with the SD-VAE's values.
SD_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, latent_channels=4, norm_num_groups=32)
# Other config.json entries, with the only values implemented here.
_FIXED = dict(act_fn="silu", use_quant_conv=True, use_post_quant_conv=True,
              mid_block_add_attention=True)


def _conv(in_channels, out_channels, kernel_size, rngs, stride=1, padding=None):
  """torch nn.Conv2d(kernel_size, stride, padding=kernel_size // 2 unless given), with bias."""
  padding = kernel_size // 2 if padding is None else padding
  return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), (stride, stride),
                  padding=padding, precision=HIGHEST, rngs=rngs)


def _group_norm(channels, groups, rngs):
  """torch nn.GroupNorm(groups, channels, eps=1e-6)."""
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-6, use_fast_variance=False,
                       rngs=rngs)


class ResnetBlock2D(nnx.Module):
  """diffusers ResnetBlock2D without a time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

  def __init__(self, in_channels, out_channels, groups, *, rngs):
    self.norm1 = _group_norm(in_channels, groups, rngs)
    self.conv1 = _conv(in_channels, out_channels, 3, rngs)
    self.norm2 = _group_norm(out_channels, groups, rngs)
    self.conv2 = _conv(out_channels, out_channels, 3, rngs)
    self.conv_shortcut = (_conv(in_channels, out_channels, 1, rngs)
                          if in_channels != out_channels else None)

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class Attention(nnx.Module):
  """diffusers Attention as the VAE uses it: one head over all H·W positions, group norm first, residual."""

  def __init__(self, channels, groups, *, rngs):
    self.group_norm = _group_norm(channels, groups, rngs)
    self.to_q = nnx.Linear(channels, channels, precision=HIGHEST, rngs=rngs)
    self.to_k = nnx.Linear(channels, channels, precision=HIGHEST, rngs=rngs)
    self.to_v = nnx.Linear(channels, channels, precision=HIGHEST, rngs=rngs)
    self.to_out = nnx.List([nnx.Linear(channels, channels, precision=HIGHEST, rngs=rngs)])

  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = self.group_norm(x).reshape(batch, height * width, channels)
    q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=HIGHEST) / jnp.sqrt(channels)
    weights = jax.nn.softmax(logits, axis=-1)
    h = self.to_out[0](jnp.einsum("bqk,bkc->bqc", weights, v, precision=HIGHEST))
    return x + h.reshape(x.shape)


class MidBlock(nnx.Module):
  """diffusers UNetMidBlock2D: resnet, attention, resnet."""

  def __init__(self, channels, groups, *, rngs):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, rngs=rngs)
                             for _ in range(2)])
    self.attentions = nnx.List([Attention(channels, groups, rngs=rngs)])

  def __call__(self, x):
    x = self.resnets[0](x)
    return self.resnets[1](self.attentions[0](x))


class Downsample2D(nnx.Module):
  """Pad right and bottom by one, then a 3x3 stride-2 conv (diffusers Downsample2D, padding=0)."""

  def __init__(self, channels, *, rngs):
    self.conv = _conv(channels, channels, 3, rngs, stride=2, padding=0)

  def __call__(self, x):
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample2D(nnx.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv (diffusers Upsample2D)."""

  def __init__(self, channels, *, rngs):
    self.conv = _conv(channels, channels, 3, rngs)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownEncoderBlock2D(nnx.Module):

  def __init__(self, in_channels, out_channels, num_layers, groups, add_downsample, *, rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, rngs=rngs)
        for i in range(num_layers)])
    self.downsamplers = (nnx.List([Downsample2D(out_channels, rngs=rngs)])
                         if add_downsample else None)

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nnx.Module):

  def __init__(self, in_channels, out_channels, num_layers, groups, add_upsample, *, rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, rngs=rngs)
        for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample2D(out_channels, rngs=rngs)]) if add_upsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nnx.Module):

  def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups,
               *, rngs):
    self.conv_in = _conv(in_channels, block_out_channels[0], 3, rngs)
    channels = [block_out_channels[0]] + list(block_out_channels)
    last = len(block_out_channels) - 1
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(channels[i], channels[i + 1], layers_per_block, groups, i < last,
                           rngs=rngs) for i in range(len(block_out_channels))])
    self.mid_block = MidBlock(block_out_channels[-1], groups, rngs=rngs)
    self.conv_norm_out = _group_norm(block_out_channels[-1], groups, rngs)
    self.conv_out = _conv(block_out_channels[-1], 2 * latent_channels, 3, rngs)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):

  def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, groups,
               *, rngs):
    reversed_channels = list(reversed(block_out_channels))
    self.conv_in = _conv(latent_channels, reversed_channels[0], 3, rngs)
    self.mid_block = MidBlock(reversed_channels[0], groups, rngs=rngs)
    channels = [reversed_channels[0]] + reversed_channels
    last = len(block_out_channels) - 1
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(channels[i], channels[i + 1], layers_per_block + 1, groups, i < last,
                         rngs=rngs) for i in range(len(block_out_channels))])
    self.conv_norm_out = _group_norm(block_out_channels[0], groups, rngs)
    self.conv_out = _conv(block_out_channels[0], out_channels, 3, rngs)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """Encoder + quant_conv (posterior moments) and post_quant_conv + decoder, float32, NHWC."""

  def __init__(self, *, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, latent_channels=4, norm_num_groups=32, rngs: nnx.Rngs):
    block_out_channels = tuple(block_out_channels)
    self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block,
                           norm_num_groups, rngs=rngs)
    self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block,
                           norm_num_groups, rngs=rngs)
    self.quant_conv = _conv(2 * latent_channels, 2 * latent_channels, 1, rngs)
    self.post_quant_conv = _conv(latent_channels, latent_channels, 1, rngs)

  def encode(self, x):
    """Images [B, H, W, C] in [-1, 1] -> posterior (mean, std), each [B, H/f, W/f, latent_channels].

    std = exp(logvar / 2) with logvar clamped to [-30, 20] (diffusers DiagonalGaussianDistribution).
    """
    mean, logvar = jnp.split(self.quant_conv(self.encoder(x)), 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

  def decode(self, z):
    """Latents [B, h, w, latent_channels] (unscaled) -> images [B, h·f, w·f, C], about [-1, 1]."""
    return self.decoder(self.post_quant_conv(z))


def weights_file(path: str) -> str:
  """The safetensors file of `path`: the file itself, or <dir>/diffusion_pytorch_model.safetensors."""
  file = os.path.join(path, WEIGHTS_FILE) if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(
        f"VAE weights {file!r} not found. Download stabilityai/sd-vae-ft-ema (or sd-vae-ft-mse) "
        f"once: its config.json and {WEIGHTS_FILE}, into one directory, and point the config "
        "at that directory (nothing is downloaded at run time).")
  return file


def architecture(path: str) -> dict:
  """AutoencoderKL arguments from the config.json beside the weights, else the SD-VAE's."""
  config_file = os.path.join(os.path.dirname(weights_file(path)), "config.json")
  if not os.path.isfile(config_file):
    return dict(SD_VAE)
  with open(config_file) as f:
    saved = json.load(f)
  for key, value in _FIXED.items():
    if saved.get(key, value) != value:
      raise ValueError(f"{config_file}: {key}={saved[key]!r}; this VAE implements {value!r} only")
  for key in ("down_block_types", "up_block_types"):
    kinds = set(saved.get(key, ()))
    if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
      raise ValueError(f"{config_file}: {key}={saved[key]}; only DownEncoderBlock2D / "
                       "UpDecoderBlock2D blocks are implemented")
  arch = {key: saved.get(key, default) for key, default in SD_VAE.items()}
  arch["block_out_channels"] = tuple(arch["block_out_channels"])
  return arch


def downsampling_factor(arch: dict) -> int:
  """Image size / latent size: 2^(number of blocks − 1) (8 for the SD-VAE)."""
  return 2 ** (len(arch["block_out_channels"]) - 1)
