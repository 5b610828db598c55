"""ConvNeXt V2 image classifier (Woo et al. 2023, "ConvNeXt V2: Co-designing and Scaling ConvNets
with Masked Autoencoders") in Flax NNX, NHWC: transformers' ConvNextV2ForImageClassification,
with its module names, so that a `save_pretrained` folder (config.json + model.safetensors, e.g.
facebook/convnextv2-base-22k-224) loads by a rename and a transpose (export/weight_files.py).

  stem:   4x4 stride-4 conv, LayerNorm (eps 1e-6)
  stage i (i > 0 first downsamples: LayerNorm, 2x2 stride-2 conv), then depths[i] blocks:
          x + pwconv2(GRN(gelu(pwconv1(LayerNorm(dwconv7x7(x))))))
  GRN:    y = γ·(y·N) + β + y, N = G / (mean_channels(G) + 1e-6), G = ‖y‖₂ over height and width
  pooled: LayerNorm(mean over height and width) (eps = config's layer_norm_eps);
  logits: classifier(pooled).

The images go in as given (the pMF code feeds its [−1, 1] images with no ImageNet normalisation).
"""
import jax
import jax.numpy as jnp
from flax import nnx

GRN_EPS = 1e-6
BLOCK_NORM_EPS = 1e-6


def _layer_norm(channels, eps, dtype, rngs):
  return nnx.LayerNorm(channels, epsilon=eps, use_fast_variance=False, dtype=dtype, rngs=rngs)


class GRN(nnx.Module):
  """Global response normalisation (module docstring); `scale` and `bias` are torch's
  grn.weight and grn.bias (stored [1, 1, 1, C] there)."""

  def __init__(self, channels, *, rngs: nnx.Rngs):
    self.scale = nnx.Param(jnp.zeros((channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, y):
    y32 = y.astype(jnp.float32)
    g = jnp.sqrt(jnp.sum(jnp.square(y32), axis=(1, 2), keepdims=True))
    n = g / (jnp.mean(g, axis=-1, keepdims=True) + GRN_EPS)
    return (self.scale[...] * (y32 * n) + self.bias[...] + y32).astype(y.dtype)


class Layer(nnx.Module):
  """One ConvNeXt V2 block (transformers' ConvNextV2Layer; drop path is off at evaluation)."""

  def __init__(self, dim, *, dtype, rngs: nnx.Rngs):
    self.dwconv = nnx.Conv(dim, dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=dim,
                           dtype=dtype, rngs=rngs)
    self.layernorm = _layer_norm(dim, BLOCK_NORM_EPS, dtype, rngs)
    self.pwconv1 = nnx.Linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
    self.grn = GRN(4 * dim, rngs=rngs)
    self.pwconv2 = nnx.Linear(4 * dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    y = self.pwconv1(self.layernorm(self.dwconv(x)))
    y = self.pwconv2(self.grn(jax.nn.gelu(y, approximate=False)))
    return x + y


class Stage(nnx.Module):
  def __init__(self, in_dim, dim, depth, *, downsample, dtype, rngs: nnx.Rngs):
    self.downsampling_layer = nnx.List(
        [_layer_norm(in_dim, BLOCK_NORM_EPS, dtype, rngs),
         nnx.Conv(in_dim, dim, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype, rngs=rngs)]
        if downsample else [])
    self.layers = nnx.List([Layer(dim, dtype=dtype, rngs=rngs) for _ in range(depth)])

  def __call__(self, x):
    for layer in (*self.downsampling_layer, *self.layers):
      x = layer(x)
    return x


class Embeddings(nnx.Module):
  def __init__(self, channels, dim, patch_size, *, dtype, rngs: nnx.Rngs):
    self.patch_embeddings = nnx.Conv(channels, dim, (patch_size, patch_size),
                                     strides=(patch_size, patch_size), padding="VALID",
                                     dtype=dtype, rngs=rngs)
    self.layernorm = _layer_norm(dim, BLOCK_NORM_EPS, dtype, rngs)

  def __call__(self, x):
    return self.layernorm(self.patch_embeddings(x))


class Encoder(nnx.Module):
  def __init__(self, hidden_sizes, depths, *, dtype, rngs: nnx.Rngs):
    dims = (hidden_sizes[0], *hidden_sizes)
    self.stages = nnx.List([Stage(dims[i], dims[i + 1], depth, downsample=i > 0, dtype=dtype,
                                  rngs=rngs) for i, depth in enumerate(depths)])

  def __call__(self, x):
    for stage in self.stages:
      x = stage(x)
    return x


class Backbone(nnx.Module):
  """transformers' ConvNextV2Model: images -> pooled features."""

  def __init__(self, hidden_sizes, depths, layer_norm_eps, patch_size, num_channels, *, dtype,
               rngs: nnx.Rngs):
    self.embeddings = Embeddings(num_channels, hidden_sizes[0], patch_size, dtype=dtype,
                                 rngs=rngs)
    self.encoder = Encoder(hidden_sizes, depths, dtype=dtype, rngs=rngs)
    self.layernorm = _layer_norm(hidden_sizes[-1], layer_norm_eps, dtype, rngs)

  def __call__(self, x):
    hidden = self.encoder(self.embeddings(x.astype(self.layernorm.dtype)))
    return self.layernorm(jnp.mean(hidden.astype(jnp.float32), axis=(1, 2)))


class ConvNextV2ForImageClassification(nnx.Module):
  """pooled(x) -> [B, hidden_sizes[-1]] (float32); __call__(x) -> logits [B, num_labels]."""

  def __init__(self, hidden_sizes, depths, num_labels, *, layer_norm_eps=1e-12, patch_size=4,
               num_channels=3, dtype=jnp.float32, rngs: nnx.Rngs):
    self.convnextv2 = Backbone(hidden_sizes, depths, layer_norm_eps, patch_size, num_channels,
                               dtype=dtype, rngs=rngs)
    self.classifier = nnx.Linear(hidden_sizes[-1], num_labels, dtype=dtype, rngs=rngs)

  def pooled(self, x):
    return self.convnextv2(x).astype(jnp.float32)

  def __call__(self, x):
    return self.classifier(self.pooled(x)).astype(jnp.float32)
