"""Precomputed latents (e.g. SD-VAE encodings of ImageNet): reading them.

Reading. `data.latents_path` is a directory with `labels.npy` ([N] integers) and either
* `latents.npy` ([N, H, W, C]): fixed latents, or
* `mean.npy` + `std.npy` ([N, H, W, C] each): the encoder posterior,
or the shards written by `--mode=encode_latents` (a `metadata.json` and `shard_NNNNN/` directories, read
as one array in shard order). Posteriors are sampled at every read: z = mean + std·n with
n ~ N(0, I) a pure function of (seed, stream position).

The arrays are memory-mapped (only the rows of a batch are read) and indexed like digits: one
endless stream of per-epoch permutations (see `builtin`). Returned latents are
(z − latent_channel_mean[c]) / latent_channel_std[c] · latent_scale; an empty tuple means
mean 0 / std 1, so with both empty this is z · latent_scale (e.g. SD-VAE's 0.18215).
Horizontal flips (data.random_flip) read the posterior of the mirrored image where the shards
hold one (encoded with data.random_flip), else mirror the W axis of the latent.

The shard directories are written by `main.py --mode=encode_latents` (kdiff_jax/encoding.py).
`unnormalize` inverts the reader's normalisation (for decoding samples with the VAE).
"""
import json
import os

import numpy as np

from kdiff_jax.data import builtin

METADATA = "metadata.json"
# IMM's normalisation of SD-VAE (stabilityai/sd-vae-ft-ema) ImageNet-256 latents: per-channel
# mean and std of the posterior samples, scaled to std 0.5 (lumalabs/imm
# configs/im256_generate_images.yaml; docs/objectives/imm.md). data.latent_channel_mean / _std / _scale.
IMM_IMAGENET_STATS = dict(latent_channel_mean=(0.86488, -0.27787343, 0.21616915, 0.3738409),
                          latent_channel_std=(4.85503674, 5.31922414, 3.93725398, 3.9870003),
                          latent_scale=0.5)
# lumalabs/tvm configs/im512_*.yaml encoder: SD-VAE latents of 512x512 ImageNet, final_std 1.
TVM_IMAGENET512_STATS = dict(latent_channel_mean=(1.56, -0.695, 0.483, 0.729),
                             latent_channel_std=(5.27, 5.91, 4.21, 4.31), latent_scale=1.0)


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


def shard_name(index: int) -> str:
  return f"shard_{index:05d}"


class ShardedRows:
  """Rows of the same-named .npy file of every shard, memory-mapped, indexed as one array."""

  def __init__(self, directories: list[str], name: str):
    self.parts = [_load(directory, name) for directory in directories]
    self.offsets = np.cumsum([0] + [len(part) for part in self.parts])
    self.shape = (int(self.offsets[-1]),) + self.parts[0].shape[1:]

  def __getitem__(self, indices: np.ndarray) -> np.ndarray:
    """Rows at the increasing integer `indices`."""
    if len(indices) == 0:
      return np.empty((0,) + self.shape[1:], self.parts[0].dtype)
    part_of = np.searchsorted(self.offsets, indices, side="right") - 1
    return np.concatenate([self.parts[part][indices[part_of == part] - self.offsets[part]]
                           for part in np.unique(part_of)])


def _shard_arrays(latents_path: str) -> dict:
  """{name: ShardedRows} of an `encode_tfds` directory; all shards must be complete."""
  with open(os.path.join(latents_path, METADATA)) as f:
    metadata = json.load(f)
  directories = [os.path.join(latents_path, shard_name(i)) for i in range(metadata["num_shards"])]
  missing = [os.path.basename(d) for d in directories if not os.path.isdir(d)]
  if missing:
    raise FileNotFoundError(
        f"data.latents_path = {latents_path!r} lacks {len(missing)} of {len(directories)} shards "
        f"(e.g. {missing[:3]}): the encoding is unfinished; rerun main.py "
        "--mode=encode_latents with the same config to complete it.")
  names = ["mean.npy", "std.npy", "labels.npy"]
  if metadata["flipped"]:
    names += ["mean_flipped.npy", "std_flipped.npy"]
  return {name: ShardedRows(directories, name) for name in names}


class LatentsSource:
  """Memory-mapped latents (or posterior mean/std, or encoded shards) with labels."""

  def __init__(self, *, latents_path: str, image_size: int, channels: int, num_classes: int,
               channel_mean, channel_std, scale: float, seed: int, random_flip: bool):
    if not latents_path:
      raise ValueError("data.latents_path is empty; set it to a directory with labels.npy and "
                       "latents.npy (or mean.npy + std.npy).")
    files = set(os.listdir(latents_path)) if os.path.isdir(latents_path) else set()
    shards = _shard_arrays(latents_path) if METADATA in files else {}
    if "labels.npy" not in files and not shards:
      raise FileNotFoundError(f"data.latents_path = {latents_path!r} has no labels.npy.")
    self.mean_flipped = self.std_flipped = None
    if shards:
      self.labels = shards["labels.npy"][np.arange(shards["labels.npy"].shape[0])]
      self.latents, self.mean, self.std = None, shards["mean.npy"], shards["std.npy"]
      arrays = {name: array for name, array in shards.items() if name != "labels.npy"}
      if random_flip and "mean_flipped.npy" in shards:
        self.mean_flipped, self.std_flipped = shards["mean_flipped.npy"], shards["std_flipped.npy"]
    elif "latents.npy" in files:
      self.labels = _load(latents_path, "labels.npy")
      self.latents, self.mean, self.std = _load(latents_path, "latents.npy"), None, None
      arrays = {"latents.npy": self.latents}
    elif {"mean.npy", "std.npy"} <= files:
      self.labels = _load(latents_path, "labels.npy")
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
    if low < 0 or (num_classes and high >= num_classes):   # num_classes = 0: labels unused
      raise ValueError(f"labels.npy in {latents_path} holds labels in [{low}, {high}]; they must "
                       f"lie in [0, data.num_classes = {num_classes}).")
    self.num_classes = num_classes
    self.channel_mean = _channel_vector(channel_mean, channels, "data.latent_channel_mean", 0.0)
    self.channel_std = _channel_vector(channel_std, channels, "data.latent_channel_std", 1.0)
    self.scale = np.float32(scale)
    self.seed = seed
    self.random_flip = random_flip

  def _read(self, array, indices: np.ndarray) -> np.ndarray:
    """Rows `indices` of a memory-mapped array (or ShardedRows), read in increasing order."""
    order = np.argsort(indices, kind="stable")
    rows = np.empty((len(indices),) + array.shape[1:], np.float32)
    rows[order] = array[indices[order]]
    return rows

  def batch(self, batch_index: int, rows: np.ndarray, global_batch_size: int) -> dict:
    stream_positions = builtin.positions(batch_index, rows, global_batch_size)
    indices = builtin.stream_indices(stream_positions, self.num_examples, self.seed)
    flips = builtin.flip_mask(self.seed, stream_positions) if self.random_flip else None
    if self.latents is not None:
      z = self._read(self.latents, indices)
    else:
      z = self._read(self.mean, indices)
      std = self._read(self.std, indices)
      if self.mean_flipped is not None:  # the encoder's posterior of the mirrored image
        z[flips] = self._read(self.mean_flipped, indices[flips])
        std[flips] = self._read(self.std_flipped, indices[flips])
      for i, position in enumerate(stream_positions):
        noise = builtin.example_rng(self.seed, builtin.LATENT_NOISE, position).standard_normal(
            self.element_shape, dtype=np.float32)
        z[i] += std[i] * noise
    z = (z - self.channel_mean) / self.channel_std * self.scale
    if self.random_flip and self.mean_flipped is None:
      z = builtin.apply_flips(z, flips)
    labels = np.asarray(self.labels[indices]).astype(np.int32)
    return dict(image=z.astype(np.float32), label=labels)


# --- the inverse of the reader's normalisation -------------------------------------------

def unnormalize(x, data_config):
  """Model-space latents -> VAE latents z = x / latent_scale · std[c] + mean[c] (numpy or jax)."""
  channels = x.shape[-1]
  mean = _channel_vector(data_config.latent_channel_mean, channels, "data.latent_channel_mean", 0.0)
  std = _channel_vector(data_config.latent_channel_std, channels, "data.latent_channel_std", 1.0)
  return x / np.float32(data_config.latent_scale) * std + mean
