"""kdiff_jax.data: sources, global-stream indexing, multi-device / multi-process layout, resume."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import kdiff_jax.data as data
from configs import default
from kdiff_jax import parallel
from kdiff_jax.data import builtin

# pytest-xdist runs the tests that share this module's fixtures on one worker.
pytestmark = pytest.mark.xdist_group("data")

BATCH_SPEC = PartitionSpec(("data", "fsdp"))


def sharding_for(num_devices: int) -> NamedSharding:
  if num_devices == 1:
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  else:
    mesh = jax.make_mesh((num_devices, 1), ("data", "fsdp"))
  return NamedSharding(mesh, BATCH_SPEC)


def data_config(**overrides):
  config = default.get_config().data
  config.update(overrides)
  return config


def take(iterator, count):
  """`count` batches as numpy (image, label) pairs."""
  return [(np.asarray(b["image"]), np.asarray(b["label"])) for b in
          (next(iterator) for _ in range(count))]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for (image_a, label_a), (image_b, label_b) in zip(a, b):
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(label_a, label_b)


# --- digits ------------------------------------------------------------------------------

def test_digits_values_shapes_and_labels_match_sklearn():
  from sklearn.datasets import load_digits
  digits = load_digits()
  labels_of = {}
  for image, label in zip(digits.images.astype(np.int64), digits.target):
    labels_of.setdefault(image.tobytes(), set()).add(int(label))

  iterator = data.build_iterator(data_config(), global_batch_size=64, sharding=sharding_for(8),
                                 seed=3)
  batch = next(iterator)
  assert batch["image"].shape == (64, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
  assert batch["image"].sharding.spec[0] == ("data", "fsdp")
  assert batch["label"].sharding.spec[0] == ("data", "fsdp")
  assert iterator.position == 1 and iterator.local_batch_size == 64
  image, label = np.asarray(batch["image"]), np.asarray(batch["label"])
  assert image.min() >= -1.0 and image.max() <= 1.0 and image.min() < 0 < image.max()
  pixels = np.rint((image[..., 0] + 1.0) * 8.0).astype(np.int64)
  np.testing.assert_allclose(pixels / 8.0 - 1.0, image[..., 0], atol=1e-6)
  for pixel, lab in zip(pixels, label):
    assert int(lab) in labels_of[pixel.tobytes()]


def test_digits_upsampling_is_bilinear():
  small = data.build_iterator(data_config(), global_batch_size=8, sharding=sharding_for(1),
                              seed=0)
  large = data.build_iterator(data_config(image_size=16), global_batch_size=8,
                              sharding=sharding_for(1), seed=0)
  (image_8, label_8), = take(small, 1)
  (image_16, label_16), = take(large, 1)
  assert image_16.shape == (8, 16, 16, 1)
  assert image_16.min() >= -1.0 and image_16.max() <= 1.0
  np.testing.assert_array_equal(label_8, label_16)
  expected = jax.image.resize(image_8, (8, 16, 16, 1), method="bilinear")
  np.testing.assert_allclose(image_16, np.asarray(expected), atol=1e-5)


def test_digits_epoch_covers_every_example_once_and_epochs_differ():
  images, _ = builtin.digits_arrays(8)
  n = len(images)
  epoch_0 = builtin.stream_indices(np.arange(n), n, seed=5)
  epoch_1 = builtin.stream_indices(np.arange(n, 2 * n), n, seed=5)
  np.testing.assert_array_equal(np.sort(epoch_0), np.arange(n))
  np.testing.assert_array_equal(np.sort(epoch_1), np.arange(n))
  assert (epoch_0 != epoch_1).mean() > 0.9

  # Through the iterator: the first N stream positions hold every image exactly once.
  batch_size = 256
  iterator = data.build_iterator(data_config(), global_batch_size=batch_size,
                                 sharding=sharding_for(8), seed=5)
  seen = np.concatenate([image for image, _ in take(iterator, -(-n // batch_size))])[:n]
  as_rows = lambda x: np.sort(np.ascontiguousarray(x.reshape(len(x), -1)).view(
      np.dtype((np.void, 64 * 4))).ravel())
  np.testing.assert_array_equal(as_rows(seen), as_rows(images))


def test_digits_flips_mirror_some_images():
  plain = data.build_iterator(data_config(), global_batch_size=64, sharding=sharding_for(8),
                              seed=1)
  flipped = data.build_iterator(data_config(random_flip=True), global_batch_size=64,
                                sharding=sharding_for(8), seed=1)
  (image, label), = take(plain, 1)
  (image_f, label_f), = take(flipped, 1)
  np.testing.assert_array_equal(label, label_f)
  same = np.all(image == image_f, axis=(1, 2, 3))
  mirrored = np.all(image[:, :, ::-1] == image_f, axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert (~same).sum() > 10 and (~mirrored).sum() > 10


# --- every indexed source: resume, devices, processes ------------------------------------

INDEXED = {
    "digits": dict(name="digits", random_flip=True),
    "synthetic": dict(name="synthetic", image_size=4, channels=3, num_classes=7),
    "subspace": dict(name="subspace", image_size=4, channels=3, num_classes=7, intrinsic_dim=5),
    "toy2d": dict(name="toy2d", toy_name="moons"),
}


@pytest.mark.parametrize("source", sorted(INDEXED))
def test_resume_equals_uninterrupted_stream(source):
  config = data_config(**INDEXED[source])
  # 32 rows x 60 batches crosses digits' epoch boundary (1797 examples) at batch 56.
  full = data.build_iterator(config, global_batch_size=32, sharding=sharding_for(8), seed=11)
  for _ in range(55):
    next(full)
  assert full.position == 55
  tail = take(full, 4)
  resumed = data.build_iterator(config, global_batch_size=32, sharding=sharding_for(8), seed=11,
                                start_batch=55)
  assert_same_batches(take(resumed, 4), tail)
  assert resumed.position == full.position == 59
  other_seed = data.build_iterator(config, global_batch_size=32, sharding=sharding_for(8),
                                   seed=12, start_batch=55)
  assert not np.array_equal(take(other_seed, 1)[0][0], tail[0][0])


@pytest.mark.parametrize("source", sorted(INDEXED))
def test_eight_devices_equal_one_device(source):
  config = data_config(**INDEXED[source])
  eight = data.build_iterator(config, global_batch_size=16, sharding=sharding_for(8), seed=2)
  one = data.build_iterator(config, global_batch_size=16, sharding=sharding_for(1), seed=2)
  batches_8 = take(eight, 3)
  assert_same_batches(batches_8, take(one, 3))
  assert len({image.tobytes() for image, _ in batches_8}) == 3


@pytest.mark.parametrize("process_of", [lambda d: d.id // 4, lambda d: d.id % 2],
                         ids=["contiguous", "interleaved"])
def test_two_simulated_processes_assemble_the_one_process_batch(process_of):
  sharding = data.leading_dim_sharding(sharding_for(8))
  batch_size = 24
  rows = [data.rows_for_process(sharding, batch_size, p, process_of) for p in (0, 1)]
  assert len(rows[0]) == len(rows[1]) == batch_size // 2
  np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(batch_size))
  if process_of(jax.devices()[1]) == 0:  # contiguous devices: process i takes the i-th chunk
    np.testing.assert_array_equal(rows[0], np.arange(batch_size // 2))

  all_rows = data.rows_for_process(sharding, batch_size, 0)  # one real process: every row
  np.testing.assert_array_equal(all_rows, np.arange(batch_size))
  for name in sorted(INDEXED):
    source = data.build_source(data_config(**INDEXED[name]), seed=4)
    whole = source.batch(7, all_rows, batch_size)
    for key in ("image", "label"):
      assembled = np.empty_like(whole[key])
      for process_rows in rows:
        assembled[process_rows] = source.batch(7, process_rows, batch_size)[key]
      np.testing.assert_array_equal(assembled, whole[key])


def test_batch_size_errors_name_the_field():
  with pytest.raises(ValueError, match="training.batch_size"):
    data.build_iterator(data_config(), global_batch_size=12, sharding=sharding_for(8), seed=0)
  with pytest.raises(ValueError, match="training.batch_size.*process"):
    parallel.check_batch(16, sharding_for(8), field="training.batch_size", process_count=3)


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="data.name.*digits.*tfds"):
    data.build_iterator(data_config(name="mnist"), global_batch_size=8, sharding=sharding_for(8),
                        seed=0)
  with pytest.raises(ValueError, match="data.toy_name.*8gaussians.*checkerboard"):
    data.build_iterator(data_config(name="toy2d", toy_name="swiss"), global_batch_size=8,
                        sharding=sharding_for(8), seed=0)
  with pytest.raises(ValueError, match="data.toy_name"):
    builtin.sample_toy2d("spirals", np.random.default_rng(0), 4)


# --- synthetic and toys -------------------------------------------------------------------

def test_synthetic_shapes_and_statistics():
  config = data_config(name="synthetic", image_size=8, channels=3, num_classes=5)
  iterator = data.build_iterator(config, global_batch_size=64, sharding=sharding_for(8), seed=0)
  (image, label), = take(iterator, 1)
  assert image.shape == (64, 8, 8, 3) and image.dtype == np.float32
  assert abs(image.mean()) < 0.05 and abs(image.std() - 1.0) < 0.05
  assert label.min() >= 0 and label.max() < 5 and len(np.unique(label)) == 5


def test_subspace_lies_on_its_subspace_with_its_class_statistics():
  """Images are A·z with A's columns orthonormal: projecting onto A loses nothing, and the
  coordinates z = A^T x scatter around their class means with std 0.5 (the source's law)."""
  config = data_config(name="subspace", image_size=6, channels=2, num_classes=3,
                       intrinsic_dim=4)
  iterator = data.build_iterator(config, global_batch_size=4096, sharding=sharding_for(8), seed=3)
  (image, label), = take(iterator, 1)
  assert image.shape == (4096, 6, 6, 2) and image.dtype == np.float32
  basis, means = builtin.subspace_basis((6, 6, 2), 4, 3)
  np.testing.assert_allclose(basis.T @ basis, np.eye(4), atol=1e-5)
  flat = image.reshape(4096, -1)
  coordinates = flat @ basis
  np.testing.assert_allclose(coordinates @ basis.T, flat, atol=1e-5)
  for c in range(3):
    around = coordinates[label == c] - means[c]
    assert len(around) > 1200
    np.testing.assert_allclose(around.mean(0), 0, atol=0.05)
    np.testing.assert_allclose(around.std(0), builtin.SUBSPACE_CLASS_STD, rtol=0.08)
  with pytest.raises(ValueError, match="data.intrinsic_dim=73"):
    builtin.subspace_basis((6, 6, 2), 73, 3)


def test_toy2d_distributions():
  rng = np.random.default_rng(0)
  points, labels = builtin.sample_toy2d("8gaussians", rng, 4000)
  assert points.shape == (4000, 2) and points.dtype == np.float32 and labels.dtype == np.int32
  np.testing.assert_array_equal(np.unique(labels), np.arange(8))
  angle = labels * np.pi / 4
  residual = points - 2.0 * np.stack([np.cos(angle), np.sin(angle)], 1)
  assert abs(residual.std() - 0.1) < 0.01

  points, labels = builtin.sample_toy2d("moons", rng, 4000)
  np.testing.assert_array_equal(np.unique(labels), [0, 1])
  assert np.all(np.abs(points.mean(0)) < 0.1) and np.all(points.std(0) > 0.3)
  assert points[labels == 0, 1].mean() > points[labels == 1, 1].mean() + 0.5

  points, labels = builtin.sample_toy2d("checkerboard", rng, 4000)
  assert np.all(labels == 0) and np.all(np.abs(points) <= 2.0)
  assert np.all((np.floor(points[:, 0]) + np.floor(points[:, 1])) % 2 == 0)  # dark squares

  iterator = data.build_iterator(data_config(name="toy2d", toy_name="8gaussians"),
                                 global_batch_size=32, sharding=sharding_for(8), seed=0)
  (points, labels), = take(iterator, 1)
  assert points.shape == (32, 2) and labels.shape == (32,)
  assert 0.5 < points.std() < 2.0 and labels.max() < 8


# --- latents -----------------------------------------------------------------------------

def test_latents_normalisation(tmp_path):
  n, size, channels = 40, 2, 3
  rng = np.random.default_rng(0)
  raw = rng.normal(3.0, 2.0, (n, size, size, channels)).astype(np.float16)
  np.save(tmp_path / "latents.npy", raw)
  np.save(tmp_path / "labels.npy", np.arange(n, dtype=np.int64))
  mean, std, scale = (1.0, 2.0, 3.0), (0.5, 2.0, 4.0), 0.25
  config = data_config(name="latents", latents_path=str(tmp_path), image_size=size,
                       channels=channels, num_classes=n, latent_channel_mean=mean,
                       latent_channel_std=std, latent_scale=scale)
  iterator = data.build_iterator(config, global_batch_size=16, sharding=sharding_for(8), seed=0)
  batches = take(iterator, 5)  # 80 reads: two epochs
  labels = np.concatenate([label for _, label in batches])
  np.testing.assert_array_equal(np.sort(labels[:n]), np.arange(n))
  for z, label in batches:
    assert z.shape == (16, size, size, channels) and z.dtype == np.float32
    expected = (raw[label].astype(np.float32) - np.array(mean)) / np.array(std) * scale
    np.testing.assert_allclose(z, expected, rtol=1e-6, atol=1e-6)

  resumed = data.build_iterator(config, global_batch_size=16, sharding=sharding_for(1), seed=0,
                                start_batch=3)
  assert_same_batches(take(resumed, 2), batches[3:])

  with pytest.raises(ValueError, match="data.latent_channel_std"):
    data.build_iterator(data_config(**{**config.to_dict(), "latent_channel_std": (1.0, 1.0)}),
                        global_batch_size=16, sharding=sharding_for(8), seed=0)
  with pytest.raises(ValueError, match="data.image_size"):
    data.build_iterator(data_config(**{**config.to_dict(), "image_size": 4}),
                        global_batch_size=16, sharding=sharding_for(8), seed=0)


def test_latents_posterior_sampling(tmp_path):
  n, size, channels = 8, 4, 2
  rng = np.random.default_rng(1)
  mean = rng.normal(0.0, 1.0, (n, size, size, channels)).astype(np.float32)
  std = rng.uniform(0.1, 2.0, (n, size, size, channels)).astype(np.float32)
  np.save(tmp_path / "mean.npy", mean)
  np.save(tmp_path / "std.npy", std)
  np.save(tmp_path / "labels.npy", np.arange(n, dtype=np.int32))
  config = data_config(name="latents", latents_path=str(tmp_path), image_size=size,
                       channels=channels, num_classes=n)
  iterator = data.build_iterator(config, global_batch_size=8, sharding=sharding_for(8), seed=0)
  batches = take(iterator, 200)  # B = N: each batch is one epoch, 200 draws of every example
  z = np.stack([image[np.argsort(label)] for image, label in batches])  # [draws, N, H, W, C]
  for _, label in batches:
    np.testing.assert_array_equal(np.sort(label), np.arange(n))
  residual = (z - mean) / std
  assert abs(residual.mean()) < 0.02 and abs(residual.std() - 1.0) < 0.02
  np.testing.assert_allclose(z.std(axis=0) / std, 1.0, atol=0.3)  # per element
  np.testing.assert_allclose(z.mean(axis=0), mean, atol=0.4 * std.max())
  assert not np.allclose(z[0], z[1])  # fresh noise at every read


# --- tfds --------------------------------------------------------------------------------

TINY_EXAMPLES = 40


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  """A 40-example TFDS dataset of random 20x28 RGB uint8 images, labels = index % 4.

  Returns (data_dir, images, labels).
  """
  from kdiff_jax.data import tfds_pipeline
  tf, tfds = tfds_pipeline._import_tf()
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (TINY_EXAMPLES, 20, 28, 3), dtype=np.uint8)
  labels = np.arange(TINY_EXAMPLES) % 4
  split = tf.data.Dataset.from_tensor_slices(dict(image=images, label=labels))
  features = tfds.features.FeaturesDict(dict(image=tfds.features.Image(shape=(None, None, 3)),
                                             label=tfds.features.ClassLabel(num_classes=4)))
  tfds.dataset_builders.store_as_tfds_dataset(name="kdiff_tiny_test", version="1.0.0",
                                              features=features, split_datasets={"train": split},
                                              data_dir=data_dir)
  return data_dir, images, labels


def adm_center_crop_reference(array, size):
  """guided-diffusion's center_crop_arr, with PIL: box halving, bicubic, centre crop."""
  from PIL import Image
  image = Image.fromarray(array)
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
  array = np.asarray(image)
  top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
  return array[top:top + size, left:left + size]


def tfds_config(tiny, **overrides):
  return data_config(name="tfds", tfds_name="kdiff_tiny_test", tfds_data_dir=tiny[0],
                     image_size=8, channels=3, num_classes=4, shuffle_buffer=16, **overrides)


def test_tfds_batches_match_the_adm_crop_and_cover_each_epoch(tiny_tfds):
  _, source_images, source_labels = tiny_tfds
  reference = np.stack([adm_center_crop_reference(x, 8) for x in source_images]) / 127.5 - 1.0
  iterator = data.build_iterator(tfds_config(tiny_tfds), global_batch_size=8,
                                 sharding=sharding_for(8), seed=0)
  batches = take(iterator, 10)  # 5 batches per epoch: two epochs
  for image, label in batches:
    assert image.shape == (8, 8, 8, 3) and image.dtype == np.float32 and label.dtype == np.int32
    assert image.min() >= -1.0 and image.max() <= 1.0
  for epoch in (batches[:5], batches[5:]):
    images = np.concatenate([image for image, _ in epoch])
    labels = np.concatenate([label for _, label in epoch])
    distance = np.abs(images[:, None] - reference[None]).mean(axis=(2, 3, 4))  # [40, 40]
    source = distance.argmin(axis=1)
    np.testing.assert_array_equal(np.sort(source), np.arange(TINY_EXAMPLES))  # each once
    assert distance.min(axis=1).max() < 2.0 / 127.5  # ADM crop to within ~1 grey level
    np.testing.assert_array_equal(labels, source_labels[source])
  epoch_0 = np.concatenate([image for image, _ in batches[:5]])
  epoch_1 = np.concatenate([image for image, _ in batches[5:]])
  assert not np.array_equal(epoch_0, epoch_1)  # reshuffled per epoch


def test_tfds_resume_and_determinism(tiny_tfds):
  # Local batch 6: 6 batches per epoch (4 examples dropped); resume inside the second epoch.
  config = tfds_config(tiny_tfds, random_flip=True)
  full = take(data.build_iterator(config, global_batch_size=6, sharding=sharding_for(1), seed=3),
              10)
  resumed = data.build_iterator(config, global_batch_size=6, sharding=sharding_for(1), seed=3,
                                start_batch=7)
  assert_same_batches(take(resumed, 3), full[7:10])
  assert resumed.position == 10
  again = data.build_iterator(config, global_batch_size=6, sharding=sharding_for(1), seed=3,
                              start_batch=4)
  assert_same_batches(take(again, 3), full[4:7])  # across the epoch boundary


def test_tfds_flip(tiny_tfds):
  plain = take(data.build_iterator(tfds_config(tiny_tfds), global_batch_size=8,
                                   sharding=sharding_for(8), seed=1), 5)
  flipped = take(data.build_iterator(tfds_config(tiny_tfds, random_flip=True),
                                     global_batch_size=8, sharding=sharding_for(8), seed=1), 5)
  image = np.concatenate([b[0] for b in plain])
  image_f = np.concatenate([b[0] for b in flipped])
  same = np.all(image == image_f, axis=(1, 2, 3))
  mirrored = np.all(image[:, :, ::-1] == image_f, axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert same.sum() >= 5 and mirrored.sum() >= 5


def test_tfds_unprepared_dataset_says_how_to_prepare(tmp_path):
  from kdiff_jax.data import tfds_pipeline
  for name in ("imagenet2012", "kdiff_no_such_dataset"):
    config = data_config(name="tfds", tfds_name=name, tfds_data_dir=str(tmp_path),
                         image_size=8, channels=3)
    with pytest.raises(tfds_pipeline.DatasetNotPreparedError,
                       match=f"tfds build {name} --data_dir={tmp_path}") as error:
      data.build_iterator(config, global_batch_size=8, sharding=sharding_for(8), seed=0)
    if name == "imagenet2012":
      assert "downloads/manual" in str(error.value)
      assert "ILSVRC2012_img_train.tar" in str(error.value)
  assert not any(tmp_path.iterdir())  # nothing was downloaded or created
