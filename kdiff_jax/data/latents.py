"""Precomputed latents (e.g. SD-VAE encodings of ImageNet) read from memory-mapped .npy files.

`data.latents_path` is a directory with `labels.npy` ([N] integers) and either
* `latents.npy` ([N, H, W, C]): fixed latents, or
* `mean.npy` + `std.npy` ([N, H, W, C] each): the encoder posterior; every read draws
  z = mean + std·n with n ~ N(0, I) a pure function of (seed, stream position).

The arrays are memory-mapped (only the rows of a batch are read) and indexed like digits: one
endless stream of per-epoch permutations (see `builtin`). Returned latents are
(z − latent_channel_mean[c]) / latent_channel_std[c] · latent_scale; an empty tuple means
mean 0 / std 1, so with both empty this is z · latent_scale (e.g. SD-VAE's 0.18215).
Horizontal flips (data.random_flip) mirror the W axis of the latent.
"""
import os

import numpy as np

from kdiff_jax.data import builtin


def _load(directory: str, name: str) -> np.ndarray:
  return np.load(os.path.join(directory, name), mmap_mode="r")


def _channel_vector(values, channels: int, field: str, default: float) -> np.ndarray:
  values = tuple(values)
  if not values:
    return np.full((channels,), default, np.float32)
  if len(values) != channels:
    raise ValueError(
        f"{field} has {len(values)} entries but the latents have {channels} channels "
        "(data.channels); give one value per channel or () for none.")
  return np.asarray(values, np.float32)


class LatentsSource:
  """Memory-mapped latents (or posterior mean/std) with labels."""

  def __init__(self, *, latents_path: str, image_size: int, channels: int, num_classes: int,
               channel_mean, channel_std, scale: float, seed: int, random_flip: bool):
    if not latents_path:
      raise ValueError("data.latents_path is empty; set it to a directory with labels.npy and "
                       "latents.npy (or mean.npy + std.npy).")
    files = set(os.listdir(latents_path)) if os.path.isdir(latents_path) else set()
    if "labels.npy" not in files:
      raise FileNotFoundError(f"data.latents_path = {latents_path!r} has no labels.npy.")
    self.labels = _load(latents_path, "labels.npy")
    if "latents.npy" in files:
      self.latents, self.mean, self.std = _load(latents_path, "latents.npy"), None, None
      arrays = {"latents.npy": self.latents}
    elif {"mean.npy", "std.npy"} <= files:
      self.latents = None
      self.mean, self.std = _load(latents_path, "mean.npy"), _load(latents_path, "std.npy")
      arrays = {"mean.npy": self.mean, "std.npy": self.std}
    else:
      raise FileNotFoundError(
          f"data.latents_path = {latents_path!r} needs latents.npy, or mean.npy and std.npy.")

    self.element_shape = (image_size, image_size, channels)
    for name, array in arrays.items():
      if array.shape != (len(self.labels),) + self.element_shape:
        raise ValueError(
            f"{name} in {latents_path} has shape {array.shape}; expected "
            f"(N={len(self.labels)}, data.image_size={image_size}, data.image_size={image_size}, "
            f"data.channels={channels}) to match labels.npy and the config.")
    if self.labels.ndim != 1 or not np.issubdtype(self.labels.dtype, np.integer):
      raise ValueError(f"labels.npy in {latents_path} must be a 1-D integer array; "
                       f"got {self.labels.dtype} {self.labels.shape}.")

    self.num_examples = len(self.labels)
    if self.num_examples == 0:
      raise ValueError(f"labels.npy in {latents_path} is empty.")
    low, high = int(self.labels.min()), int(self.labels.max())
    if low < 0 or high >= num_classes:
      raise ValueError(f"labels.npy in {latents_path} holds labels in [{low}, {high}]; they must "
                       f"lie in [0, data.num_classes = {num_classes}).")
    self.num_classes = num_classes
    self.channel_mean = _channel_vector(channel_mean, channels, "data.latent_channel_mean", 0.0)
    self.channel_std = _channel_vector(channel_std, channels, "data.latent_channel_std", 1.0)
    self.scale = np.float32(scale)
    self.seed = seed
    self.random_flip = random_flip

  def _read(self, array: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Rows `indices` of a memory-mapped array, read in increasing order (disk locality)."""
    order = np.argsort(indices, kind="stable")
    rows = np.empty((len(indices),) + array.shape[1:], np.float32)
    rows[order] = array[indices[order]]
    return rows

  def batch(self, batch_index: int, rows: np.ndarray, global_batch_size: int) -> dict:
    stream_positions = builtin.positions(batch_index, rows, global_batch_size)
    indices = builtin.stream_indices(stream_positions, self.num_examples, self.seed)
    if self.latents is not None:
      z = self._read(self.latents, indices)
    else:
      z = self._read(self.mean, indices)
      std = self._read(self.std, indices)
      for i, position in enumerate(stream_positions):
        noise = builtin.example_rng(self.seed, builtin.LATENT_NOISE, position).standard_normal(
            self.element_shape, dtype=np.float32)
        z[i] += std[i] * noise
    z = (z - self.channel_mean) / self.channel_std * self.scale
    if self.random_flip:
      z = builtin.apply_flips(z, builtin.flip_mask(self.seed, stream_positions))
    labels = np.asarray(self.labels[indices]).astype(np.int32)
    return dict(image=z.astype(np.float32), label=labels)
