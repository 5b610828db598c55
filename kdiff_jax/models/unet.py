"""SongUNet: the DDPM++ U-Net of Song et al. (2021) with IMM's second time embedding, in Flax NNX.

A port of NVlabs/edm `training/networks.py` SongUNet (Karras et al. 2022) with DDPM++'s settings
(positional time embedding, standard encoder and decoder, resample filter [1, 1], one attention
head, adaptive_scale=False, resample_proj=True, channel_mult_emb 4, channel_mult_noise 1) and the
s-embedding of lumalabs/imm `training/unets.py` (Zhou, Ermon, Song 2025). NHWC images; t and s in
[0, 1], the embeddings see time_scale·t (IMMPrecond's c_noise = 1000·t):

  e_t = map_layer1(silu(map_layer0(pe(time_scale·t) [+ map_label(√K·onehot_K(y))])))
  e_s = map_layer1_s(silu(map_layer0_s(pe(time_scale·s))))         (second_time_embedder)
  emb = silu(e_t [+ e_s])
  pe(c) = [sin(c·f), cos(c·f)],  f_i = 10000^(-i/(C/2 - 1)),  i < C/2

(pe: EDM's PositionalEmbedding with endpoint=True and its halves swapped, as SongUNet does.)
Encoder `enc`: 'RxR_conv' (3x3) at the input resolution R, then per level a 'RxR_down' block
(below the top) and num_blocks 'RxR_blockI'; every output is kept as a skip. Decoder `dec`, from
the bottom level up: 'RxR_in0' (with attention) and 'RxR_in1' at the bottom, 'RxR_up' above it,
then num_blocks + 1 'RxR_blockI' on concat(x, skip) (attention in the last where R is in
attn_resolutions); out = RxR_aux_conv(silu(RxR_aux_norm(x))) at the top.

Labels: num_classes = K > 0 adds EDM's map_label on the one-hot label; the null (CFG) label K
one-hots to the zero vector, IMM's null condition. num_classes = 0 is EDM's label_dim = 0: labels
are accepted and ignored (IMM's CIFAR-10 model is unconditional).

Names are EDM's, so a parameter path joined with '.' is the torch state_dict key after a leaf
rename (kernel -> weight, scale -> weight) and the value a transpose; the torch state_dict also
holds EDM's persistent `resample_filter` buffers (export/convert.py: `unet_to_torch`,
`unet_from_torch`).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdiff_jax import parallel
from kdiff_jax.models import layers

# name -> (model_channels, channel_mult, num_blocks, attn_resolutions). 'ddpmpp': EDM's and IMM's
# CIFAR-10 DDPM++ (55,732,739 parameters; 56,061,443 with the s-embedding); 'T': tiny, for CPU.
SIZES = {
    "T": (16, (1, 2), 1, (16,)),
    "ddpmpp": (128, (2, 2, 2), 4, (16,)),
}
CHANNEL_MULT_EMB = 4         # embedding width = 4·model_channels
RESAMPLE_FILTER = (1, 1)     # DDPM++ (`resample`; EDM's torch modules keep it as a buffer)
SKIP_SCALE = math.sqrt(0.5)
MAX_PERIOD = 10000

INIT_ZERO = 1e-5             # EDM's init_zero weight: conv1, attention proj and aux_conv
INIT_ATTN = math.sqrt(0.2)   # EDM's init_attn weight: qkv


def xavier_uniform(init_weight: float = 1.0):
  """EDM's weight_init('xavier_uniform')·init_weight: U(±init_weight·√(6/(fan_in + fan_out))),
  fans times k² for a k x k conv (biases are 0: init_bias = 0)."""
  return nnx.initializers.variance_scaling(init_weight**2, "fan_avg", "uniform")


def conv(in_channels: int, out_channels: int, kernel: int, *, rngs: nnx.Rngs, init_weight=1.0,
         dtype=jnp.float32) -> nnx.Conv:
  """EDM's Conv2d without resampling: k x k, padding k // 2, with a bias.

  Kernel [k, k, in, out] named (None, None, 'embed', 'mlp'), bias ('mlp',).
  """
  return nnx.Conv(in_channels, out_channels, (kernel, kernel), padding=kernel // 2,
                  dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=layers.partitioned(xavier_uniform(init_weight),
                                                 (None, None, "embed", "mlp")),
                  bias_init=layers.partitioned(layers.zeros, ("mlp",)), rngs=rngs)


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, in_axis="embed",
           dtype=jnp.float32) -> nnx.Linear:
  """EDM's Linear: xavier_uniform weight, zero bias; kernel named (in_axis, 'mlp')."""
  return layers.linear(in_features, out_features, (in_axis, "mlp"), kernel_init=xavier_uniform(),
                       dtype=dtype, rngs=rngs)


def group_norm(channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.GroupNorm:
  """EDM's GroupNorm: min(32, C // 4) groups of consecutive channels, eps 1e-6, statistics in
  float32; scale (torch: weight) 1, bias 0, both named (None,)."""
  return nnx.GroupNorm(channels, num_groups=min(32, channels // 4), epsilon=1e-6,
                       use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32,
                       scale_init=layers.partitioned(nnx.initializers.ones_init(), (None,)),
                       bias_init=layers.partitioned(layers.zeros, (None,)), rngs=rngs)


def resample_filter() -> np.ndarray:
  """EDM's 2-D filter f ⊗ f / (Σf)², [k, k] float32: the torch `resample_filter` buffer [1, 1, k, k]
  of a resampling conv (not a parameter here: `resample` is its convolution)."""
  taps = np.asarray(RESAMPLE_FILTER, np.float64)
  return (np.outer(taps, taps) / taps.sum() ** 2).astype(np.float32)


def resample(x, direction: str):
  """EDM's Conv2d resampling (non-fused) with DDPM++'s filter f = [1, 1], i.e. f ⊗ f / 4 and
  padding (2 - 1) // 2 = 0, per channel: 'down' = conv2d(x, f ⊗ f / 4, stride 2), the mean of
  each 2x2 block; 'up' = conv_transpose2d(x, f ⊗ f, stride 2), each pixel copied to a 2x2 block.
  """
  batch, height, width, channels = x.shape
  if direction == "down":
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def dropout(x, rate: float, rng):
  """torch.nn.functional.dropout in training: x·m/(1 - rate), m ~ Bernoulli(1 - rate)."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def positional_embedding(c, channels: int):
  """pe(c) = [sin(c·f), cos(c·f)], f_i = 10000^(-i/(channels/2 - 1)), [B, channels] float32.

  EDM's PositionalEmbedding(endpoint=True) followed by SongUNet's swap of the halves; f in
  float64 rounded once to float32 (IMM computes f in float64, EDM in float32).
  """
  half = channels // 2
  freqs = (1.0 / MAX_PERIOD) ** (np.arange(half, dtype=np.float64) / (half - 1))
  args = jnp.asarray(c, jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class UNetBlock(nnx.Module):
  """EDM's UNetBlock as DDPM++ builds it (one head, adaptive_scale=False, resample_proj=True):

    h = conv0(resample(silu(norm0(x))));  h = silu(norm1(h + affine(emb)))
    x = (conv1(dropout(h)) + skip(resample(x)))·√½       skip: a 1x1 conv if the shape changes
    x = (proj(attention(qkv(norm2(x)))) + x)·√½          (attention=True)

  attention: EDM's AttentionOp, softmax(qᵀk/√C) over the H·W keys in float32; qkv's 3C output
  channels are EDM's (C, 3) layout (channel 3c + j is q, k, v for j = 0, 1, 2).
  """

  def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *,
               rngs: nnx.Rngs, resample: str | None = None, attention: bool = False,
               dropout: float = 0.0, dtype=jnp.float32):
    self.resample = resample
    self.dropout = dropout
    self.norm0 = group_norm(in_channels, dtype=dtype, rngs=rngs)
    self.conv0 = conv(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
    self.affine = linear(emb_channels, out_channels, dtype=dtype, rngs=rngs)
    self.norm1 = group_norm(out_channels, dtype=dtype, rngs=rngs)
    self.conv1 = conv(out_channels, out_channels, 3, init_weight=INIT_ZERO, dtype=dtype, rngs=rngs)
    self.skip = (conv(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                 if in_channels != out_channels or resample else None)
    self.norm2 = group_norm(out_channels, dtype=dtype, rngs=rngs) if attention else None
    self.qkv = (conv(out_channels, 3 * out_channels, 1, init_weight=INIT_ATTN, dtype=dtype,
                     rngs=rngs) if attention else None)
    self.proj = (conv(out_channels, out_channels, 1, init_weight=INIT_ZERO, dtype=dtype, rngs=rngs)
                 if attention else None)

  def _resampled(self, x):
    return resample(x, self.resample) if self.resample else x

  def __call__(self, x, emb, dropout_rng=None):
    h = self.conv0(self._resampled(jax.nn.silu(self.norm0(x))))
    h = jax.nn.silu(self.norm1(h + self.affine(emb)[:, None, None, :]))
    if dropout_rng is not None and self.dropout:
      h = dropout(h, self.dropout, dropout_rng)
    h = self.conv1(h)
    x = (h + (x if self.skip is None else self.skip(self._resampled(x)))) * SKIP_SCALE
    if self.qkv is None:
      return x
    batch, height, width, channels = x.shape
    qkv = self.qkv(self.norm2(x)).reshape(batch, height * width, channels, 3)
    q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
    logits = jnp.einsum("bqc,bkc->bqk", q.astype(jnp.float32),
                        (k / math.sqrt(channels)).astype(jnp.float32))
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    attended = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(x.shape)
    return (self.proj(attended) + x) * SKIP_SCALE


class SongUNet(nnx.Module):
  """DDPM++ with IMM's s-embedding: [B, H, W, C] x, [B] t in [0, 1], [B] labels, [B] s.

  dropout: EDM's dropout in every block, applied only when the call gets a `dropout_rng` (the
  training passes); block i draws with fold_in(dropout_rng, i).
  """

  def __init__(self, *, input_size: int, in_channels: int, model_channels: int,
               channel_mult, num_blocks: int, attn_resolutions, num_classes: int,
               second_time_embedder: bool, dropout: float = 0.0, time_scale: float = 1000.0,
               dtype=jnp.float32, remat: str = "none", rngs: nnx.Rngs):
    if input_size % 2 ** (len(channel_mult) - 1):
      raise ValueError(f"input_size={input_size} does not halve {len(channel_mult) - 1} times")
    self.input_size = input_size
    self.in_channels = self.out_channels = in_channels
    self.num_classes = num_classes
    self.noise_channels = model_channels
    self.time_scale = float(time_scale)
    self.dtype = jnp.dtype(dtype)
    self._use_remat, self._remat_policy = layers.remat_policy(remat, "remat")
    emb_channels = CHANNEL_MULT_EMB * model_channels

    self.map_label = (linear(num_classes, model_channels, in_axis="classes", rngs=rngs)
                      if num_classes else None)
    self.map_layer0 = linear(model_channels, emb_channels, rngs=rngs)
    self.map_layer1 = linear(emb_channels, emb_channels, rngs=rngs)
    self.map_layer0_s = (linear(model_channels, emb_channels, rngs=rngs)
                         if second_time_embedder else None)
    self.map_layer1_s = (linear(emb_channels, emb_channels, rngs=rngs)
                         if second_time_embedder else None)

    block = functools.partial(UNetBlock, emb_channels=emb_channels, dropout=dropout, dtype=dtype,
                              rngs=rngs)
    self.enc, skips = nnx.Dict(), []
    for level, mult in enumerate(channel_mult):
      res = input_size >> level
      if level == 0:
        self.enc[f"{res}x{res}_conv"] = conv(in_channels, model_channels, 3, dtype=dtype,
                                             rngs=rngs)
        channels = model_channels
      else:
        self.enc[f"{res}x{res}_down"] = block(channels, channels, resample="down")
      skips.append(channels)
      for idx in range(num_blocks):
        self.enc[f"{res}x{res}_block{idx}"] = block(channels, model_channels * mult,
                                                    attention=res in attn_resolutions)
        channels = model_channels * mult
        skips.append(channels)

    self.dec = nnx.Dict()
    for level, mult in reversed(list(enumerate(channel_mult))):
      res = input_size >> level
      if level == len(channel_mult) - 1:
        self.dec[f"{res}x{res}_in0"] = block(channels, channels, attention=True)
        self.dec[f"{res}x{res}_in1"] = block(channels, channels)
      else:
        self.dec[f"{res}x{res}_up"] = block(channels, channels, resample="up")
      for idx in range(num_blocks + 1):
        self.dec[f"{res}x{res}_block{idx}"] = block(
            channels + skips.pop(), model_channels * mult,
            attention=idx == num_blocks and res in attn_resolutions)
        channels = model_channels * mult
    top = f"{input_size}x{input_size}"
    # The forward order (an nnx.Dict's own order is not kept through split / merge).
    self._encoder, self._decoder = tuple(self.enc), tuple(self.dec)
    self._input, self._aux_norm, self._aux_conv = (f"{top}_conv", f"{top}_aux_norm",
                                                   f"{top}_aux_conv")
    self.dec[self._aux_norm] = group_norm(channels, dtype=dtype, rngs=rngs)
    self.dec[self._aux_conv] = conv(channels, in_channels, 3, init_weight=INIT_ZERO, dtype=dtype,
                                    rngs=rngs)

  @property
  def second_time_embedder(self) -> bool:
    return self.map_layer0_s is not None

  def embedding(self, t, y, s=None):
    """emb = silu(e_t [+ e_s]) (module docstring), float32 [B, 4·model_channels]."""
    if self.second_time_embedder != (s is not None):
      raise ValueError(f"this SongUNet has second_time_embedder={self.second_time_embedder}: "
                       "pass s (IMM's s or t - s) exactly when it is True "
                       "(model.second_time_embedder)")
    emb = positional_embedding(self.time_scale * jnp.asarray(t, jnp.float32), self.noise_channels)
    if self.map_label is not None:
      emb = emb + self.map_label(jax.nn.one_hot(y, self.num_classes) * math.sqrt(self.num_classes))
    emb = self.map_layer1(jax.nn.silu(self.map_layer0(emb)))
    if s is not None:
      emb_s = positional_embedding(self.time_scale * jnp.asarray(s, jnp.float32),
                                   self.noise_channels)
      emb = emb + self.map_layer1_s(jax.nn.silu(self.map_layer0_s(emb_s)))
    return jax.nn.silu(emb)

  def _block(self, block, index: int, x, emb, dropout_rng):
    rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
    if self._use_remat:
      x = layers.checkpointed_call(block, self._remat_policy, x, emb, rng)
    else:
      x = block(x, emb, rng)
    return parallel.constrain_batch(x)

  def __call__(self, x, t, y, s=None, *, dropout_rng=None):
    emb = parallel.constrain_batch(self.embedding(t, y, s))
    x = self.enc[self._input](x.astype(self.dtype))
    skips = [x]
    for index, name in enumerate(self._encoder[1:], start=1):
      x = self._block(self.enc[name], index, x, emb, dropout_rng)
      skips.append(x)
    for index, name in enumerate(self._decoder, start=len(self._encoder)):
      if "_block" in name:  # the decoder's blockI take the skip of their encoder twin
        x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = self._block(self.dec[name], index, x, emb, dropout_rng)
    x = self.dec[self._aux_conv](jax.nn.silu(self.dec[self._aux_norm](x)))
    return x.astype(jnp.float32)


def unet_from_config(config, dtype, rngs: nnx.Rngs) -> SongUNet:
  """A SongUNet of size config.model.size for config.data's images; class-conditional on
  data.num_classes labels unless model.class_conditional is False; computing in `dtype`."""
  model, data = config.model, config.data
  model_channels, channel_mult, num_blocks, attn_resolutions = SIZES[model.size]
  return SongUNet(input_size=data.image_size, in_channels=data.channels,
                  model_channels=model_channels, channel_mult=channel_mult,
                  num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                  num_classes=data.num_classes if model.class_conditional else 0,
                  second_time_embedder=model.second_time_embedder, dropout=model.dropout,
                  time_scale=model.time_scale, dtype=dtype, remat=model.remat, rngs=rngs)


def check(config) -> None:
  """The settings a SongUNet cannot take."""
  model, data = config.model, config.data
  if model.patch_size != 1:
    raise ValueError(f"model.patch_size={model.patch_size}: model.name='unet' has no patches (it "
                     "convolves every pixel): set model.patch_size=1")
  if model.scan_blocks:
    raise ValueError("model.scan_blocks=True: the U-Net's blocks differ in shape and cannot be "
                     "stacked into one scan: set model.scan_blocks=False")
  levels = len(SIZES[model.size][1])
  if data.image_size % 2 ** (levels - 1):
    raise ValueError(f"data.image_size={data.image_size}: model.size={model.size!r} halves the "
                     f"image {levels - 1} times; use a multiple of {2 ** (levels - 1)}")
