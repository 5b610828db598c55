"""LPIPS with VGG16 (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric"; the `lpips` package 0.1.4, net='vgg', version 0.1) in Flax NNX, NHWC.

  d(x̂, x) = Σ_l mean_{h,w} w_l · (n(f_l(s(x̂))) − n(f_l(s(x))))²

s: the input scaling layer, (x − shift)/scale with shift (−.030, −.088, −.188) and scale (.458,
.448, .450) on images in [−1, 1] (the same as ImageNet's mean/std on (x + 1)/2, which lpips_j,
the port the pMF code calls, applies); f_l: torchvision's VGG16 `features` after the ReLUs
relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; n: each position's channel vector divided by its
L2 norm + 1e-10; w_l: a 1x1 convolution to one channel without bias (the package's `lin0` ...
`lin4`, whose dropout is off at evaluation). The result is one distance per example.

Names: the convolutions are torchvision's (`features.0` ... `features.28`, a max-pool after
features 3, 8, 15 and 22), the heads `lin0` ... `lin4`; export/weight_files.py reads torchvision's
VGG16 state_dict and the package's `weights/v0.1/vgg.pth` (whose keys `lin{l}.model.1.weight` it
renames). `widths` other than VGG16's build the same network narrower (tiny random nets for CPU
demos).
"""
import jax
import jax.numpy as jnp
from flax import nnx

# VGG16's convolutions per stage (a 2x2 max-pool between stages); LPIPS taps each stage's last ReLU.
VGG16_WIDTHS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


def unit_channels(features):
  """f / (‖f‖₂ + 1e-10) over the channel axis, in float32 (lpips' normalize_tensor). The norm is
  taken as sqrt(max(Σf², 1e-30)): the same value, and a finite gradient where a position's
  channels are all zero (dead ReLUs), whose zero ReLU derivative then stops it."""
  features = features.astype(jnp.float32)
  norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(features), axis=-1, keepdims=True), 1e-30))
  return features / (norm + NORM_EPS)


def paired(a, b):
  """[2B, ...]: a and b interleaved (rows 2i, 2i + 1 are a_i, b_i), so one pass of a net runs
  both; with the batch sharded, each example's pair stays on its shard (concatenating [a; b]
  instead puts a's rows on one half of the shards and b's on the other, and the comparison of
  their features then moves every activation between shards)."""
  return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def unpaired(features):
  """(the a rows, the b rows) of a net's output on `paired(a, b)`."""
  features = features.reshape((-1, 2) + features.shape[1:])
  return features[:, 0], features[:, 1]


class LPIPS(nnx.Module):
  """The LPIPS distance of two batches of images in [−1, 1] (module docstring)."""

  def __init__(self, widths=VGG16_WIDTHS, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.widths = tuple(tuple(stage) for stage in widths)
    self.dtype = dtype
    convs, index, channels = {}, 0, 3
    for stage, stage_widths in enumerate(self.widths):
      index += stage > 0   # the max-pool before every stage but the first
      for width in stage_widths:
        convs[str(index)] = nnx.Conv(channels, width, (3, 3), padding=((1, 1), (1, 1)),
                                     dtype=dtype, rngs=rngs)
        index, channels = index + 2, width   # the convolution and its ReLU
    self.features = nnx.Dict(convs)
    for tap, stage_widths in enumerate(self.widths):
      setattr(self, f"lin{tap}", nnx.Conv(stage_widths[-1], 1, (1, 1), use_bias=False,
                                          dtype=dtype, rngs=rngs))

  def taps(self, x):
    """[relu1_2, ..., relu5_3] of the scaled images x in [−1, 1]."""
    x = ((x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)).astype(self.dtype)
    outputs, index = [], 0
    for stage, stage_widths in enumerate(self.widths):
      if stage:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        index += 1
      for _ in stage_widths:
        x = jax.nn.relu(self.features[str(index)](x))
        index += 2
      outputs.append(x)
    return outputs

  def __call__(self, x_hat, x):
    """[B] LPIPS distances between x_hat and x, both [B, H, W, 3] in [−1, 1]."""
    batch = x.shape[0]
    distance = jnp.zeros((batch,), jnp.float32)
    for tap, features in enumerate(self.taps(paired(x_hat, x))):
      features_hat, features = unpaired(unit_channels(features))
      squared = jnp.square(features_hat - features).astype(self.dtype)
      weighted = getattr(self, f"lin{tap}")(squared).astype(jnp.float32)
      distance = distance + jnp.mean(weighted, axis=(1, 2, 3))
    return distance
