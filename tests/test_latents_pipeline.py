"""Latent pipeline: a tiny TFDS dataset encoded into posterior shards by 2 processes
(main.py --mode=encode_latents), checked against diffusers' PyTorch VAE, resumed after a lost
shard, read back by the latent source (flipped posteriors included), and a tiny IMM ImageNet
config (configs/imm_in256.py shrunk) trains 2 steps from the shards."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import kdiff_jax.data as data  # noqa: E402
from configs import imm_in256  # noqa: E402
from kdiff_jax import encoding  # noqa: E402
from kdiff_jax.data import builtin, latents, tfds_pipeline  # noqa: E402
from tests.test_data import TINY_EXAMPLES, sharding_for, tiny_tfds  # noqa: E402,F401
from tests.test_multihost import ROOT, free_port  # noqa: E402
from tests.test_vae import nchw, nhwc, torch_vae  # noqa: E402
from tests.conftest import xla_flags  # noqa: E402

# pytest-xdist runs the tests that share this module's fixtures on one worker.
pytestmark = pytest.mark.xdist_group("latents")

# A tiny VAE with downsampling factor 2: 8x8 images -> 4x4x4 latents.
TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2)
SHARD_SIZE = 6  # 40 examples -> 7 shards, the last one of 4


def overrides(tiny, vae_dir, latents_dir):
  return {"data.tfds_name": "kdiff_tiny_test", "data.tfds_data_dir": tiny[0],
          "data.image_size": 4, "data.num_classes": 4, "data.vae_path": str(vae_dir),
          "data.latents_path": str(latents_dir), "data.latent_shard_size": SHARD_SIZE,
          "data.encode_batch_size": 4, "data.random_flip": True}


def tiny_imm_config(fields):
  config = imm_in256.get_config()
  for path, value in fields.items():
    section, field = path.split(".")
    config[section][field] = value
  config.model.size = "T"
  config.model.compute_dtype = "float32"
  config.training.update(batch_size=32, num_steps=2, log_every=1, checkpoint_every=2,
                         sample_every=0)
  config.sampling.update(num_steps=2, grid_size=2)
  return config


@pytest.fixture(scope="module")
def encoded(tiny_tfds, tmp_path_factory):
  """Shards written by 2 processes x 2 CPU devices; returns (config, torch VAE, log texts)."""
  root = tmp_path_factory.mktemp("latents")
  vae_model = torch_vae(root / "vae", **TINY_VAE)
  fields = overrides(tiny_tfds, root / "vae", root / "shards")
  port, procs, logs = free_port(), [], []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
    log = str(root / f"log{i}.txt")
    logs.append(log)
    command = [sys.executable, "main.py", "--config=configs/imm_in256.py",
               f"--workdir={root}", "--mode=encode_latents",
               *(f"--config.{k}={v}" for k, v in fields.items()),
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
    procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(log, "w"),
                                  stderr=subprocess.STDOUT))
  for process, log in zip(procs, logs):
    assert process.wait(timeout=240) == 0, open(log).read()[-3000:]
  return tiny_imm_config(fields), vae_model, [open(log).read() for log in logs]


def expected_posteriors(images, vae_model, flip):
  """Torch VAE posteriors of the ADM centre crops (8x8) of the source images."""
  crops = np.stack([np.asarray(tfds_pipeline.center_crop_adm(image, 8)) for image in images])
  x = (crops / 127.5 - 1.0).astype(np.float32)
  if flip:
    x = x[:, :, ::-1]
  with torch.no_grad():
    posterior = vae_model.encode(nchw(x)).latent_dist
  return nhwc(posterior.mean), nhwc(posterior.std)


def shard_arrays(directory, name):
  return np.concatenate([np.load(os.path.join(directory, latents.shard_name(i), name))
                         for i in range(7)])


def test_two_processes_write_every_shard_once_with_the_vae_posteriors(encoded, tiny_tfds):
  config, vae_model, logs = encoded
  directory = config.data.latents_path
  assert sorted(os.listdir(directory)) == sorted(
      [latents.METADATA] + [latents.shard_name(i) for i in range(7)])
  for process, log in enumerate(logs):  # process p encodes shards p, p + 2, ...
    written = sorted(int(line.split("shard_")[1][:5]) for line in log.splitlines()
                     if "wrote" in line and "shard_" in line)
    assert written == list(range(process, 7, 2))
  # Row i of the shards is example i of the split in TFDS's stored order.
  _, tfds = tfds_pipeline._import_tf()
  split = list(tfds.as_numpy(tfds_pipeline.prepared_builder("kdiff_tiny_test", tiny_tfds[0])
                             .as_dataset(split="train", shuffle_files=False)))
  split_images = np.stack([example["image"] for example in split])
  np.testing.assert_array_equal(shard_arrays(directory, "labels.npy"),
                                [example["label"] for example in split])
  for flip, suffix in ((False, ""), (True, "_flipped")):
    mean_ref, std_ref = expected_posteriors(split_images, vae_model, flip)
    mean, std = shard_arrays(directory, f"mean{suffix}.npy"), shard_arrays(directory, f"std{suffix}.npy")
    assert mean.shape == (TINY_EXAMPLES, 4, 4, 4)
    error = max(np.abs(mean - mean_ref).max(), np.abs(std - std_ref).max())
    print(f"max |shards - torch VAE posterior| (flip={flip}): {error:.2e}")
    assert error <= 1e-4


def test_resume_rewrites_only_missing_shards(encoded):
  import shutil
  config, _, _ = encoded
  directory = config.data.latents_path
  before = shard_arrays(directory, "mean.npy")
  times = {i: os.path.getmtime(os.path.join(directory, latents.shard_name(i), "mean.npy"))
           for i in range(7)}
  shutil.rmtree(os.path.join(directory, latents.shard_name(3)))
  with pytest.raises(FileNotFoundError, match="unfinished"):
    data.build_source(config.data, seed=0)
  encoding.encode_tfds(config)  # one process with 8 devices resumes what two processes began
  for i in range(7):
    changed = os.path.getmtime(os.path.join(directory, latents.shard_name(i), "mean.npy")) != times[i]
    assert changed == (i == 3)
  np.testing.assert_allclose(shard_arrays(directory, "mean.npy"), before, atol=1e-5)
  other = config.copy_and_resolve_references()
  other.data.latent_shard_size = 5
  with pytest.raises(ValueError, match="shard_size"):
    encoding.encode_tfds(other)


def test_latent_source_reads_shards_and_flipped_posteriors(encoded):
  config, _, _ = encoded
  directory = config.data.latents_path
  mean = {False: shard_arrays(directory, "mean.npy"), True: shard_arrays(directory, "mean_flipped.npy")}
  std = {False: shard_arrays(directory, "std.npy"), True: shard_arrays(directory, "std_flipped.npy")}
  iterator = data.build_iterator(config.data, global_batch_size=16, sharding=sharding_for(8),
                                 seed=5, start_batch=2)
  batch = next(iterator)
  image = np.asarray(batch["image"])
  positions = builtin.positions(2, np.arange(16), 16)
  indices = builtin.stream_indices(positions, TINY_EXAMPLES, 5)
  flips = builtin.flip_mask(5, positions)
  assert 0 < flips.sum() < 16
  channel_mean = np.array(config.data.latent_channel_mean, np.float32)
  channel_std = np.array(config.data.latent_channel_std, np.float32)
  for row, (index, flip, position) in enumerate(zip(indices, flips, positions)):
    noise = builtin.example_rng(5, builtin.LATENT_NOISE, position).standard_normal(
        (4, 4, 4), dtype=np.float32)
    z = mean[flip][index] + std[flip][index] * noise
    np.testing.assert_allclose(image[row],
                               (z - channel_mean) / channel_std * 0.5, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(batch["label"]),
                                shard_arrays(directory, "labels.npy")[indices])


def test_tiny_imm_config_trains_two_steps_from_the_shards(encoded, tmp_path):
  from kdiff_jax import train
  config, _, _ = encoded
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state["step"]) == 2
  assert os.path.exists(tmp_path / "samples" / "step_00000002.png")
