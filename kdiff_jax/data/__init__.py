"""Data: one checkpointable iterator of global, batch-sharded arrays for every source.

  iterator = build_iterator(config.data, global_batch_size=config.training.batch_size,
                            sharding=batch_sharding, seed=config.seed, start_batch=position)
  batch = next(iterator)   # dict(image=[B, H, W, C] float32, label=[B] int32), global arrays
  iterator.position        # batches consumed; rebuild with start_batch=position to resume

Sources (data.name): 'digits', 'synthetic', 'subspace', 'toy2d' (`builtin`), 'latents' (`latents`) and
'tfds' (`tfds_pipeline`). Each process produces only the rows of the global batch that its
devices hold under `sharding` (`rows_for_process`) and the global arrays are assembled with
`jax.make_array_from_process_local_data`. For the in-memory sources global batch b is a pure
function of (seed, b), so it is the same for any number of processes or devices; a tfds
process reads its own `split_for_jax_process` slice instead.
"""
from typing import Callable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from kdiff_jax import parallel
from kdiff_jax.data import builtin
from kdiff_jax.schema import boolean, number, one_of, sequence, text

NAMES = ("digits", "synthetic", "subspace", "toy2d", "latents", "tfds")
# The built-in datasets' fixed shapes: name -> (channels, classes; None: the labels are not used).
BUILTIN_SHAPES = {"digits": (1, 10), "toy2d": (2, None)}

RULES = {
    "data.name": one_of(*NAMES),
    "data.image_size": number(1, integer=True),
    "data.channels": number(1, integer=True),
    "data.num_classes": number(0, integer=True),   # 0: unconditional (every label 0, unused)
    "data.random_flip": boolean(),
    "data.tfds_name": text(),
    "data.tfds_split": text(),
    "data.tfds_data_dir": text(),
    "data.latents_path": text(),
    "data.latent_channel_mean": sequence(number()),
    "data.latent_channel_std": sequence(number(0, low_open=True)),
    "data.latent_scale": number(0, low_open=True),
    "data.toy_name": one_of(*builtin.TOY_NAMES),
    "data.intrinsic_dim": number(1, integer=True),
    "data.shuffle_buffer": number(1, integer=True),
    "data.vae_path": text(),
    "data.latent_shard_size": number(1, integer=True),
    "data.encode_batch_size": number(1, integer=True),
}


def check(config) -> None:
  """A source's needs (a TFDS name, a latents path) and the built-in datasets' own shapes."""
  data = config.data
  if data.name == "tfds" and not data.tfds_name:
    raise ValueError("data.name='tfds' needs data.tfds_name (e.g. 'cifar10', 'imagenet2012')")
  if data.name == "latents" and not data.latents_path:
    raise ValueError("data.name='latents' needs data.latents_path (the directory of "
                     "--mode=encode_latents, or of labels.npy with latents.npy or mean/std.npy)")
  for field in ("latent_channel_mean", "latent_channel_std"):
    values = tuple(data[field])
    if values and len(values) != data.channels:
      raise ValueError(f"data.{field} has {len(values)} entries but data.channels="
                       f"{data.channels}: give one value per channel, or () for none")
  if data.name in BUILTIN_SHAPES:
    channels, classes = BUILTIN_SHAPES[data.name]
    if data.channels != channels:
      raise ValueError(f"data.channels={data.channels}: data.name={data.name!r} has {channels}")
    if classes is not None and 0 < data.num_classes < classes:
      raise ValueError(f"data.num_classes={data.num_classes}: data.name={data.name!r} has "
                       f"{classes} classes")


def rows_for_process(sharding: NamedSharding, global_batch_size: int, process_index: int,
                     process_of: Callable[[jax.Device], int] = lambda device: device.process_index,
                     ) -> np.ndarray:
  """Sorted rows of the global batch held by the devices of process `process_index`.

  Pure in its arguments: `process_of` maps a device to its process (tests pass a fake one to
  simulate several processes). On the usual meshes (devices of a process contiguous along the
  batch axes) process i of n gets the i-th contiguous chunk of B / n rows.
  """
  index_map = sharding.devices_indices_map((global_batch_size,))
  rows = set()
  for device, index in index_map.items():
    if process_of(device) == process_index:
      rows.update(range(*index[0].indices(global_batch_size)))
  if not rows:
    raise ValueError(f"Process {process_index} holds no device of the mesh {sharding.mesh}.")
  return np.array(sorted(rows), np.int64)


def leading_dim_sharding(sharding: NamedSharding) -> NamedSharding:
  """`sharding`'s spec on dim 0 only (other dims replicated): fits images and labels alike."""
  batch_axes = sharding.spec[0] if len(sharding.spec) else None
  return NamedSharding(sharding.mesh, PartitionSpec(batch_axes))


class DataIterator:
  """Iterator of global batches dict(image, label); `position` = batches consumed."""

  def __init__(self, local_batches: Iterator[dict], *, global_batch_size: int,
               local_batch_size: int, element_shape: tuple, sharding: NamedSharding,
               start_batch: int):
    self._local_batches = local_batches
    self._sharding = leading_dim_sharding(sharding)
    self._position = start_batch
    self.global_batch_size = global_batch_size
    self.local_batch_size = local_batch_size
    self.element_shape = tuple(element_shape)

  @property
  def position(self) -> int:
    """Batches consumed so far, counted from the start of the stream (not of this iterator)."""
    return self._position

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    local = next(self._local_batches)
    image = np.asarray(local["image"], np.float32)
    label = np.asarray(local["label"], np.int32)
    if image.shape != (self.local_batch_size,) + self.element_shape:
      raise AssertionError(f"local image batch {image.shape}, expected "
                           f"{(self.local_batch_size,) + self.element_shape}")
    batch = dict(
        image=jax.make_array_from_process_local_data(
            self._sharding, image, (self.global_batch_size,) + self.element_shape),
        label=jax.make_array_from_process_local_data(
            self._sharding, label, (self.global_batch_size,)))
    self._position += 1
    return batch


def _indexed_batches(source, start_batch: int, rows: np.ndarray,
                     global_batch_size: int) -> Iterator[dict]:
  batch_index = start_batch
  while True:
    yield source.batch(batch_index, rows, global_batch_size)
    batch_index += 1


def element_shape(data_config) -> tuple:
  """The shape of one example: (2,) for the 2-D toys, else (image_size, image_size, channels)."""
  if data_config.name == "toy2d":
    return (2,)
  return (data_config.image_size, data_config.image_size, data_config.channels)


def build_source(data_config, *, seed: int):
  """The indexed (in-memory / memory-mapped) source named by data.name."""
  name = data_config.name
  if name == "digits":
    return builtin.DigitsSource(image_size=data_config.image_size, seed=seed,
                                random_flip=data_config.random_flip)
  if name == "synthetic":
    return builtin.SyntheticSource(image_size=data_config.image_size,
                                   channels=data_config.channels,
                                   num_classes=data_config.num_classes, seed=seed)
  if name == "subspace":
    return builtin.SubspaceSource(image_size=data_config.image_size,
                                  channels=data_config.channels,
                                  num_classes=data_config.num_classes,
                                  intrinsic_dim=data_config.intrinsic_dim, seed=seed)
  if name == "toy2d":
    return builtin.Toy2dSource(toy_name=data_config.toy_name, seed=seed)
  if name == "latents":
    from kdiff_jax.data import latents
    return latents.LatentsSource(
        latents_path=data_config.latents_path, image_size=data_config.image_size,
        channels=data_config.channels, num_classes=data_config.num_classes,
        channel_mean=data_config.latent_channel_mean, channel_std=data_config.latent_channel_std,
        scale=data_config.latent_scale, seed=seed, random_flip=data_config.random_flip)
  raise ValueError(f"data.name = {name!r}; allowed values: {', '.join(NAMES)}")


def build_iterator(data_config, *, global_batch_size: int, sharding: NamedSharding, seed: int,
                   start_batch: int = 0, field: str = "training.batch_size") -> DataIterator:
  """The batch iterator of data.name, positioned at global batch `start_batch`; `field` names
  the config field of global_batch_size in errors."""
  if data_config.name not in NAMES:
    raise ValueError(f"data.name = {data_config.name!r}; allowed values: {', '.join(NAMES)}")
  if start_batch < 0:
    raise ValueError(f"start_batch = {start_batch} must be >= 0.")
  process_count = jax.process_count()
  parallel.check_batch(global_batch_size, sharding, field=field)
  rows = rows_for_process(leading_dim_sharding(sharding), global_batch_size, jax.process_index())

  if data_config.name == "tfds":
    if len(rows) * process_count != global_batch_size:
      raise ValueError(
          "data.name = 'tfds' reads a disjoint slice per process, so every process must hold "
          f"B / process_count rows; this one holds {len(rows)} of {global_batch_size} (the batch "
          "mesh axes must span all processes).")
    from kdiff_jax.data import tfds_pipeline
    source = tfds_pipeline.TfdsSource(
        name=data_config.tfds_name, split=data_config.tfds_split,
        data_dir=data_config.tfds_data_dir, image_size=data_config.image_size,
        channels=data_config.channels, num_classes=data_config.num_classes,
        random_flip=data_config.random_flip, shuffle_buffer=data_config.shuffle_buffer,
        local_batch_size=len(rows), seed=seed, process_index=jax.process_index(),
        process_count=process_count)
    local_batches = source.batches(start_batch)
  else:
    source = build_source(data_config, seed=seed)
    local_batches = _indexed_batches(source, start_batch, rows, global_batch_size)

  if data_config.num_classes == 0:   # unconditional: the dataset's labels are not passed on
    local_batches = ({**batch, "label": np.zeros(len(batch["label"]), np.int32)}
                     for batch in local_batches)
  return DataIterator(local_batches, global_batch_size=global_batch_size,
                      local_batch_size=len(rows), element_shape=source.element_shape,
                      sharding=sharding, start_batch=start_batch)
