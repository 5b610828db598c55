"""TFDS image datasets: each process reads its own slice, decodes, crops, flips, batches.

Per process: `tfds.split_for_jax_process(split, drop_remainder=True)` (so every process has the
same number of examples), then epoch after epoch

  files shuffled + shuffle(data.shuffle_buffer) of the *encoded* records, both seeded by
  (seed, process, epoch) → decode → ADM centre crop to data.image_size → flip → [−1, 1]
  → batch(local batch, drop_remainder) → prefetch.

Each epoch is its own tf.data pipeline (the last partial batch of an epoch is dropped), so the
stream is deterministic (tf.data `deterministic=True`, stateless flips keyed by
(seed, process, epoch, index in epoch)) and resuming at batch k costs no decoding of the
skipped batches: whole epochs are skipped for free, and inside the resumed epoch
`(k mod batches_per_epoch) · local_batch` encoded records are read and dropped (at most one
epoch of I/O, which for ImageNet is ~140 GB / process_count). Building each new epoch refills
the shuffle buffer, a short pause once per epoch.

TensorFlow is imported lazily here only and never sees the GPU/TPU. Nothing is downloaded: an
unprepared dataset raises `DatasetNotPreparedError` saying how to prepare it.
"""
import functools
import os
from typing import Iterator

import numpy as np


class DatasetNotPreparedError(FileNotFoundError):
  """The TFDS dataset is not in the data dir; the message says how to prepare it."""


@functools.lru_cache(maxsize=None)
def _import_tf():
  """Imports tensorflow and tensorflow_datasets with TF kept off accelerators."""
  import tensorflow as tf
  for device_type in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], device_type)
    except (RuntimeError, ValueError):  # already initialised, or no such device type
      pass
  import tensorflow_datasets as tfds
  return tf, tfds


def prepare_instructions(name: str, data_dir: str, manual_instructions: str = "") -> str:
  """The message for a dataset that is not prepared in `data_dir` ('' = TFDS default)."""
  shown_dir = data_dir or os.environ.get("TFDS_DATA_DIR", "") or "~/tensorflow_datasets"
  where = f"data.tfds_data_dir = {data_dir!r}" if data_dir else f"the TFDS default ({shown_dir})"
  base_name = name.split(":")[0].split("/")[0]
  lines = [
      f"TFDS dataset {name!r} is not prepared in {where}, and this pipeline never downloads.",
      "Prepare it once, on a machine with internet access and enough disk:",
      f"    tfds build {name} --data_dir={shown_dir}",
      f"(or in Python: tfds.builder({name!r}, data_dir={shown_dir!r}).download_and_prepare()),",
      "then point data.tfds_data_dir at that directory (local disk or a gs:// bucket every host "
      "can read).",
  ]
  if base_name.startswith("imagenet2012") or manual_instructions:
    lines.append(
        f"{base_name} needs a manual download first: place the archives in "
        f"{shown_dir}/downloads/manual/ before running `tfds build`"
        + (" (ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
           "https://image-net.org/download-images)." if base_name.startswith("imagenet2012")
           else "."))
    if manual_instructions:
      lines.append("TFDS says: " + " ".join(manual_instructions.split()))
  return "\n".join(lines)


def prepared_builder(name: str, data_dir: str):
  """The TFDS builder of a prepared dataset, or DatasetNotPreparedError."""
  if not name:
    raise ValueError("data.tfds_name is empty; set it to a TFDS name such as 'imagenet2012'.")
  _, tfds = _import_tf()
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.DatasetNotFoundError as error:  # not registered and no files in data_dir
    raise DatasetNotPreparedError(prepare_instructions(name, data_dir)) from error
  if not builder.is_prepared():
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) or ""
    raise DatasetNotPreparedError(prepare_instructions(name, data_dir, manual))
  return builder


def center_crop_adm(image, image_size: int):
  """ADM's centre crop (guided-diffusion image_datasets.center_crop_arr) on a uint8 image.

  Halve with a box filter while the short side is >= 2·S, resize bicubically (antialiased) so
  the short side is S, round to uint8, then crop the centre S×S.
  """
  tf, _ = _import_tf()

  def too_big(image):
    return tf.reduce_min(tf.shape(image)[:2]) >= 2 * image_size

  def halve(image):
    half = tf.image.resize(image, tf.shape(image)[:2] // 2, method="area")
    return (tf.cast(tf.clip_by_value(tf.round(half), 0, 255), tf.uint8),)

  image, = tf.while_loop(too_big, halve, (image,),
                         shape_invariants=(tf.TensorShape([None, None, image.shape[-1]]),))
  height_width = tf.cast(tf.shape(image)[:2], tf.float64)
  scale = image_size / tf.reduce_min(height_width)
  new_size = tf.cast(tf.round(height_width * scale), tf.int32)
  image = tf.image.resize(image, new_size, method="bicubic", antialias=True)
  image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
  top = (new_size[0] - image_size) // 2
  left = (new_size[1] - image_size) // 2
  return image[top:top + image_size, left:left + image_size, :]


class TfdsSource:
  """This process's slice of a TFDS split as an endless stream of local numpy batches."""

  def __init__(self, *, name: str, split: str, data_dir: str, image_size: int, channels: int,
               num_classes: int, random_flip: bool, shuffle_buffer: int, local_batch_size: int,
               seed: int, process_index: int, process_count: int):
    tf, tfds = _import_tf()
    self.builder = prepared_builder(name, data_dir)
    features = self.builder.info.features
    if "image" not in features:
      raise ValueError(f"TFDS dataset {name!r} has no 'image' feature (has {list(features)}).")
    self.has_label = "label" in features
    if self.has_label and hasattr(features["label"], "num_classes"):
      if 0 < num_classes < features["label"].num_classes:   # 0: unconditional, labels unused
        raise ValueError(f"TFDS dataset {name!r} has {features['label'].num_classes} classes but "
                         f"data.num_classes = {num_classes}.")
    self.split = tfds.split_for_jax_process(split, process_index=process_index,
                                            process_count=process_count, drop_remainder=True)
    self.examples_per_epoch = self.builder.info.splits[self.split].num_examples
    self.batches_per_epoch = self.examples_per_epoch // local_batch_size
    if self.batches_per_epoch == 0:
      raise ValueError(
          f"The slice of {name!r} split {split!r} read by each process has "
          f"{self.examples_per_epoch} examples, fewer than the local batch of "
          f"{local_batch_size} (training.batch_size / jax.process_count()).")
    self.element_shape = (image_size, image_size, channels)
    self.image_size = image_size
    self.channels = channels
    self.random_flip = random_flip
    self.shuffle_buffer = shuffle_buffer
    self.local_batch_size = local_batch_size
    self.seed = seed
    self.process_index = process_index
    options = tf.data.Options()
    options.deterministic = True
    self.options = options

  def epoch_seeds(self, epoch: int) -> tuple[int, int]:
    """(shuffle seed, flip key) of one epoch of this process."""
    state = np.random.SeedSequence(
        (int(self.seed) % (1 << 63), self.process_index, epoch)).generate_state(2, np.uint32)
    return int(state[0]), int(state[1])

  def epoch_dataset(self, epoch: int, skip_batches: int = 0):
    """The tf.data pipeline of one epoch, starting after `skip_batches` batches."""
    tf, tfds = _import_tf()
    shuffle_seed, flip_key = self.epoch_seeds(epoch)
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, options=self.options,
                                  try_autocache=False)
    dataset = self.builder.as_dataset(split=self.split, shuffle_files=True, read_config=read_config,
                                      decoders={"image": tfds.decode.SkipDecoding()})
    if self.shuffle_buffer > 1:  # 0 or 1: file order only
      dataset = dataset.shuffle(self.shuffle_buffer, seed=shuffle_seed,
                                reshuffle_each_iteration=False)
    dataset = dataset.enumerate().skip(skip_batches * self.local_batch_size)

    def preprocess(index, example):
      image = tf.io.decode_image(example["image"], channels=self.channels,
                                 expand_animations=False)
      image = center_crop_adm(image, self.image_size)
      if self.random_flip:
        flip = tf.random.stateless_uniform(
            [], seed=tf.stack([tf.constant(flip_key, tf.int64), index])) < 0.5
        image = tf.cond(flip, lambda: image[:, ::-1, :], lambda: image)
      image = tf.ensure_shape(image / 127.5 - 1.0, self.element_shape)
      if self.has_label:
        label = tf.cast(example["label"], tf.int32)
      else:
        label = tf.zeros([], tf.int32)
      return dict(image=tf.cast(image, tf.float32), label=label)

    dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(self.local_batch_size, drop_remainder=True)
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(self.options)

  def batches(self, start_batch: int) -> Iterator[dict]:
    """Local batches start_batch, start_batch + 1, … as numpy dicts."""
    epoch, skip = divmod(start_batch, self.batches_per_epoch)
    while True:
      for batch in self.epoch_dataset(epoch, skip).as_numpy_iterator():
        yield batch
      epoch, skip = epoch + 1, 0
