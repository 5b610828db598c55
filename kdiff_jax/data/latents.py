"""Precomputed latents (e.g. SD-VAE encodings of ImageNet): writing them, reading them, decoding.

Reading. `data.latents_path` is a directory with `labels.npy` ([N] integers) and either
* `latents.npy` ([N, H, W, C]): fixed latents, or
* `mean.npy` + `std.npy` ([N, H, W, C] each): the encoder posterior,
or the shards written by `encode_tfds` (a `metadata.json` and `shard_NNNNN/` directories, read
as one array in shard order). Posteriors are sampled at every read: z = mean + std·n with
n ~ N(0, I) a pure function of (seed, stream position).

The arrays are memory-mapped (only the rows of a batch are read) and indexed like digits: one
endless stream of per-epoch permutations (see `builtin`). Returned latents are
(z − latent_channel_mean[c]) / latent_channel_std[c] · latent_scale; an empty tuple means
mean 0 / std 1, so with both empty this is z · latent_scale (e.g. SD-VAE's 0.18215).
Horizontal flips (data.random_flip) read the posterior of the mirrored image where the shards
hold one (encoded with data.random_flip), else mirror the W axis of the latent.

Writing (`main.py --mode=encode_latents`, `encode_tfds`). The TFDS split data.tfds_name /
data.tfds_split, ADM centre-cropped to data.image_size × the VAE's factor (256 for 32×32
SD-VAE latents), is encoded by the VAE of data.vae_path into data.latents_path:
`shard_{i:05d}/{mean,std,labels}.npy` (+ `mean_flipped.npy`, `std_flipped.npy` of the mirrored
images when data.random_flip) holds examples [i·S, (i+1)·S) of the split, S =
data.latent_shard_size. Process p of P encodes shards p, p + P, … on its own devices (no
collectives); a shard is written to a temporary directory and renamed when complete, and
shards already present are skipped, so an interrupted job resumes, on any number of processes.
The directory must be on a filesystem every host sees and that supports rename and mmap.

Decoding. `unnormalize` inverts the reader's normalisation; `decode_for_display` turns sample
grids of latent models into images with the VAE decoder when data.vae_path is set.
"""
import functools
import json
import math
import os
import shutil

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kdiff_jax.data import builtin

METADATA = "metadata.json"


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
    if low < 0 or high >= num_classes:
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


# --- decoding ----------------------------------------------------------------------------

def unnormalize(x, data_config):
  """Model-space latents -> VAE latents z = x / latent_scale · std[c] + mean[c] (numpy or jax)."""
  channels = x.shape[-1]
  mean = _channel_vector(data_config.latent_channel_mean, channels, "data.latent_channel_mean", 0.0)
  std = _channel_vector(data_config.latent_channel_std, channels, "data.latent_channel_std", 1.0)
  return x / np.float32(data_config.latent_scale) * std + mean


@functools.lru_cache(maxsize=2)
def load_vae(vae_path: str):
  """(graphdef, params, arch) of the VAE at vae_path (see models.vae.load), read once."""
  from kdiff_jax.models import vae
  return vae.load(vae_path)


@functools.lru_cache(maxsize=2)
def _decoder(vae_path: str):
  graphdef, params, _ = load_vae(vae_path)
  return jax.jit(lambda params, z: nnx.merge(graphdef, params).decode(z)), params


def decode_for_display(config, samples) -> np.ndarray:
  """Samples as viewable images in about [-1, 1]: decoded by the VAE for latent models.

  data.name = 'latents' with data.vae_path set: unnormalize, then the VAE decoder;
  'latents' without a VAE: the first three latent channels; any other data: unchanged.
  """
  samples = np.asarray(samples, np.float32)
  if config.data.name != "latents":
    return samples
  if not config.data.vae_path:
    return samples[..., :3]
  decode, params = _decoder(config.data.vae_path)
  return np.asarray(decode(params, unnormalize(samples, config.data)))


# --- encoding ----------------------------------------------------------------------------

def _write_metadata(directory: str, metadata: dict) -> None:
  """Write metadata.json, or check that the one there describes the same encoding."""
  path = os.path.join(directory, METADATA)
  if os.path.exists(path):
    with open(path) as f:
      existing = json.load(f)
    different = {key: (existing.get(key), value) for key, value in metadata.items()
                 if key != "vae_path" and existing.get(key) != value}
    if different:
      raise ValueError(f"{path} describes another encoding ({{field: (there, now)}} = "
                       f"{different}); use a new data.latents_path or the same settings.")
    return
  temporary = f"{path}.tmp{jax.process_index()}"
  with open(temporary, "w") as f:
    json.dump(metadata, f, indent=1)
  os.replace(temporary, path)


def _shard_images(builder, split: str, start: int, stop: int, image_size: int, batch_size: int):
  """Batches (images [b, S, S, 3] in [-1, 1], labels [b]) of split[start:stop], in order."""
  from kdiff_jax.data import tfds_pipeline
  tf, tfds = tfds_pipeline._import_tf()
  options = tf.data.Options()
  options.deterministic = True
  dataset = builder.as_dataset(
      split=f"{split}[{start}:{stop}]", shuffle_files=False,
      read_config=tfds.ReadConfig(options=options, try_autocache=False),
      decoders={"image": tfds.decode.SkipDecoding()})
  has_label = "label" in builder.info.features

  def preprocess(example):
    image = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
    image = tfds_pipeline.center_crop_adm(image, image_size) / 127.5 - 1.0
    label = tf.cast(example["label"], tf.int32) if has_label else tf.zeros([], tf.int32)
    return tf.cast(image, tf.float32), label

  dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def encode_tfds(config) -> str:
  """Encode data.tfds_name/tfds_split into posterior shards under data.latents_path (see above).

  Returns data.latents_path. Each batch is padded to a fixed size (one compilation) that
  splits over this process's devices.
  """
  from kdiff_jax import config as config_lib
  from kdiff_jax.data import tfds_pipeline
  from kdiff_jax.models import vae
  config_lib.validate(config)
  data = config.data
  if not data.latents_path or not data.vae_path:
    raise ValueError("--mode=encode_latents needs data.latents_path (output directory) and "
                     f"data.vae_path; got {data.latents_path!r} and {data.vae_path!r}.")
  graphdef, params, arch = load_vae(data.vae_path)
  if data.channels != arch["latent_channels"]:
    raise ValueError(f"data.channels = {data.channels} but the VAE at {data.vae_path!r} has "
                     f"{arch['latent_channels']} latent channels.")
  image_size = data.image_size * vae.downsampling_factor(arch)
  builder = tfds_pipeline.prepared_builder(data.tfds_name, data.tfds_data_dir)
  num_examples = builder.info.splits[data.tfds_split].num_examples
  shard_size = data.latent_shard_size
  num_shards = math.ceil(num_examples / shard_size)
  os.makedirs(data.latents_path, exist_ok=True)
  _write_metadata(data.latents_path, dict(
      tfds_name=data.tfds_name, tfds_split=data.tfds_split, num_examples=num_examples,
      shard_size=shard_size, num_shards=num_shards, image_size=image_size,
      latent_size=data.image_size, channels=data.channels, flipped=bool(data.random_flip),
      vae_path=data.vae_path))

  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  rows = NamedSharding(mesh, PartitionSpec("batch"))
  batch_size = math.ceil(data.encode_batch_size / len(devices)) * len(devices)
  encode = jax.jit(lambda params, x: nnx.merge(graphdef, params).encode(x),
                   in_shardings=(NamedSharding(mesh, PartitionSpec()), rows),
                   out_shardings=(rows, rows))
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))

  def posterior(images):
    padded = np.zeros((batch_size,) + images.shape[1:], np.float32)
    padded[:len(images)] = images
    mean, std = encode(params, jax.device_put(padded, rows))
    return np.asarray(mean)[:len(images)], np.asarray(std)[:len(images)]

  for index in range(jax.process_index(), num_shards, jax.process_count()):
    final = os.path.join(data.latents_path, shard_name(index))
    if os.path.isdir(final):
      continue
    start, stop = index * shard_size, min((index + 1) * shard_size, num_examples)
    arrays = {name: [] for name in ("mean", "std", "labels", "mean_flipped", "std_flipped")}
    for images, labels in _shard_images(builder, data.tfds_split, start, stop, image_size,
                                        batch_size):
      mean, std = posterior(images)
      arrays["mean"].append(mean)
      arrays["std"].append(std)
      arrays["labels"].append(labels)
      if data.random_flip:
        mean, std = posterior(images[:, :, ::-1])
        arrays["mean_flipped"].append(mean)
        arrays["std_flipped"].append(std)
    temporary = f"{final}.tmp{jax.process_index()}"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    for name, parts in arrays.items():
      if parts:
        np.save(os.path.join(temporary, name + ".npy"), np.concatenate(parts))
    os.replace(temporary, final)
    logging.info("process %d: wrote %s (examples %d-%d of %d)", jax.process_index(), final,
                 start, stop - 1, num_examples)
  return data.latents_path
