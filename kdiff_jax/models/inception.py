"""The FID InceptionV3 (pytorch-fid's `fid_inception_v3`) in Flax NNX, NHWC, float32.

This is the network of TensorFlow's FID code (the 2015-12-05 Inception graph) as mseitzer's
pytorch-fid ports it: torchvision's Inception3 with 1008 classes and no aux head, where the
Mixed_5b-d (A), Mixed_6b-e (C) and Mixed_7b (E) blocks average-pool without counting the
zero padding and Mixed_7c max-pools its pool branch. Module names are torchvision's
(Conv2d_1a_3x3.conv, Mixed_6b.branch7x7dbl_3.bn, fc), so pytorch-fid's weights file
`pt_inception-2015-12-05-6726825d.pth`
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth)
loads by a rename and a transpose (export/weight_files.py: `inception(path)`; `python -m
kdiff_jax.export.weight_files IN.pth OUT.npz` converts it, with torch, into an .npz that loads
without torch).

Input: uint8 images [B, H, W, 3] (or 1 channel, repeated to 3) -> x/255 -> bilinear resize to
299x299 (torch's F.interpolate, align_corners=False, no antialiasing) -> 2x - 1 -> the
network. Output: the 2048-d pool features (FID, precision/recall) and the 1008 logits (IS).
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdiff_jax import images as images_lib

# Full float32 matmuls and convolutions on every backend (TPUs default to bfloat16 passes).
HIGHEST = jax.lax.Precision.HIGHEST
INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURES = 2048


class BasicConv2d(nnx.Module):
  """torchvision BasicConv2d: conv (no bias), BatchNorm(eps=1e-3) with running statistics, ReLU."""

  def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, *, rngs):
    kernel_size = (kernel_size,) * 2 if isinstance(kernel_size, int) else kernel_size
    padding = (padding,) * 2 if isinstance(padding, int) else padding
    self.conv = nnx.Conv(in_channels, out_channels, kernel_size, (stride, stride),
                         padding=[(p, p) for p in padding], use_bias=False, precision=HIGHEST,
                         rngs=rngs)
    self.bn = nnx.BatchNorm(out_channels, use_running_average=True, epsilon=1e-3,
                            use_fast_variance=False, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
  """3x3 stride-1 average over the in-image neighbours only (TF's, count_include_pad=False)."""
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


def _max_pool_3x3(x, stride, padding):
  return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding),) * 2)


class InceptionA(nnx.Module):

  def __init__(self, in_channels, pool_features, *, rngs):
    self.branch1x1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg_pool_3x3(x))], axis=-1)


class InceptionB(nnx.Module):

  def __init__(self, in_channels, *, rngs):
    self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(nnx.Module):

  def __init__(self, in_channels, channels_7x7, *, rngs):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x):
    branch7x7dbl = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      branch7x7dbl = layer(branch7x7dbl)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
        branch7x7dbl,
        self.branch_pool(_avg_pool_3x3(x))], axis=-1)


class InceptionD(nnx.Module):

  def __init__(self, in_channels, *, rngs):
    self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    branch7x7x3 = self.branch7x7x3_2(self.branch7x7x3_1(x))
    return jnp.concatenate([
        self.branch3x3_2(self.branch3x3_1(x)),
        self.branch7x7x3_4(self.branch7x7x3_3(branch7x7x3)),
        _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(nnx.Module):
  """pool='avg': FIDInceptionE_1 (Mixed_7b); pool='max': FIDInceptionE_2 (Mixed_7c)."""

  def __init__(self, in_channels, pool, *, rngs):
    self.pool = pool
    self.branch1x1 = BasicConv2d(in_channels, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x):
    branch3x3 = self.branch3x3_1(x)
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, 1, 1)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3),
        self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl),
        self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
  """images uint8 [B, H, W, 1 | 3] -> (pool features [B, 2048], logits [B, 1008]), float32."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
    self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
    self.fc = nnx.Linear(FEATURES, NUM_CLASSES, precision=HIGHEST, rngs=rngs)

  def __call__(self, images):
    x = jnp.asarray(images, jnp.float32) / 255.0
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    # images.bilinear_matrix is torch's bilinear weights (half-pixel, edges clamped) both ways.
    rows = images_lib.bilinear_matrix(x.shape[1], INPUT_SIZE).astype(np.float32)
    columns = images_lib.bilinear_matrix(x.shape[2], INPUT_SIZE).astype(np.float32)
    x = jnp.einsum("ih,bhwc,jw->bijc", rows, x, columns, precision=HIGHEST)
    x = 2.0 * x - 1.0
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool_3x3(x, 2, 0)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool_3x3(x, 2, 0)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    features = jnp.mean(x, axis=(1, 2))
    return features, self.fc(features)
