"""main.py --mode=encode_latents: encode a TFDS split with the VAE into latent shards.

The TFDS split data.tfds_name / data.tfds_split, ADM centre-cropped to data.image_size × the
VAE's factor (256 for 32×32 SD-VAE latents), is encoded by the VAE of data.vae_path into
data.latents_path: `shard_{i:05d}/{mean,std,labels}.npy` (+ `mean_flipped.npy`,
`std_flipped.npy` of the mirrored images when data.random_flip) holds examples [i·S, (i+1)·S) of
the split, S = data.latent_shard_size. Process p of P encodes shards p, p + P, … on its own
devices (no collectives); a shard is written to a temporary directory and renamed when
complete, and shards already present are skipped, so an interrupted job resumes, on any number
of processes. The directory must be on a filesystem every host sees and that supports rename
and mmap. `data.latents.LatentsSource` reads the result.
"""
import json
import math
import os
import shutil

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kdiff_jax import console
from kdiff_jax.data import latents, tfds_pipeline
from kdiff_jax.export import weight_files
from kdiff_jax.models import vae


def _write_metadata(directory: str, metadata: dict) -> None:
  """Write metadata.json, or check that the one there describes the same encoding."""
  path = os.path.join(directory, latents.METADATA)
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
  data = config.data
  if not data.latents_path or not data.vae_path:
    raise ValueError("--mode=encode_latents needs data.latents_path (output directory) and "
                     f"data.vae_path; got {data.latents_path!r} and {data.vae_path!r}.")
  graphdef, params, arch = weight_files.vae(data.vae_path)
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
    final = os.path.join(data.latents_path, latents.shard_name(index))
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
    console.each("wrote %s (examples %d-%d of %d)", final, start, stop - 1, num_examples)
  return data.latents_path
