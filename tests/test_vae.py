"""The Flax SD-VAE against diffusers' PyTorch AutoencoderKL: same random weights, same outputs."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from kdiff_jax import viewing  # noqa: E402
from kdiff_jax.export import weight_files  # noqa: E402
from kdiff_jax.models import vae  # noqa: E402

# pytest-xdist runs the tests that share this module's fixtures on one worker.
pytestmark = pytest.mark.xdist_group("vae")

# A small AutoencoderKL: three blocks (factor 4), two resnets per block, 8 norm groups.
SMALL = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
             latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3)


def torch_vae(directory, seed=0, **arguments):
  """A diffusers AutoencoderKL with random weights (default init + noise, so biases and norms
  are not trivial), saved with save_pretrained (config.json + safetensors) into `directory`."""
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**{**SMALL, **arguments}).eval()
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.05 * torch.randn_like(parameter))
  model.save_pretrained(str(directory), safe_serialization=True)
  return model


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def small_vae(tmp_path_factory):
  directory = tmp_path_factory.mktemp("vae")
  return directory, torch_vae(directory)


def test_flax_vae_matches_diffusers(small_vae):
  from flax import nnx
  directory, reference = small_vae
  graphdef, params, arch = weight_files.vae(str(directory))
  assert arch["block_out_channels"] == (16, 32, 32) and vae.downsampling_factor(arch) == 4
  import jax
  encode = jax.jit(lambda params, x: nnx.merge(graphdef, params).encode(x))
  decode = jax.jit(lambda params, z: nnx.merge(graphdef, params).decode(z))
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 24, 16, 3)).astype(np.float32)
  with torch.no_grad():
    posterior = reference.encode(nchw(x)).latent_dist
    mean_ref, std_ref = nhwc(posterior.mean), nhwc(posterior.std)
    z = rng.normal(size=mean_ref.shape).astype(np.float32)
    decoded_ref = nhwc(reference.decode(nchw(z)).sample)
  mean, std = encode(params, x)
  decoded = decode(params, z)
  assert mean.shape == (2, 6, 4, 4) and decoded.shape == x.shape
  errors = {name: float(np.abs(np.asarray(ours) - theirs).max()) for name, ours, theirs in
            (("mean", mean, mean_ref), ("std", std, std_ref), ("decode", decoded, decoded_ref))}
  print("max |flax - diffusers|:", errors)
  assert max(errors.values()) <= 1e-4
  assert np.abs(decoded_ref).max() > 0.1 and std_ref.std() > 0.01  # non-trivial outputs


def test_legacy_attention_names_and_bare_safetensors(small_vae, tmp_path):
  """Checkpoints saved before diffusers 0.14 name the attention query/key/value/proj_attn; a
  bare .safetensors file (no config.json) is read as the SD-VAE architecture."""
  from safetensors.numpy import load_file, save_file
  directory, _ = small_vae
  state = load_file(str(directory / vae.WEIGHTS_FILE))
  renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
  legacy = {}
  for key, value in state.items():
    for new, old in renames.items():
      key = key.replace(new, old)
    legacy[key] = value
  assert any(".proj_attn." in key for key in legacy)
  (tmp_path / "legacy").mkdir()
  save_file(legacy, str(tmp_path / "legacy" / vae.WEIGHTS_FILE))
  (tmp_path / "legacy" / "config.json").write_text((directory / "config.json").read_text())
  _, params, _ = weight_files.vae(str(tmp_path / "legacy"))
  _, expected, _ = weight_files.vae(str(directory))
  import jax
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)

  bare = tmp_path / "bare.safetensors"
  save_file(state, str(bare))
  assert vae.architecture(str(bare)) == vae.SD_VAE
  with pytest.raises(ValueError, match="has shape"):
    weight_files.vae(str(bare))  # small weights, SD-VAE architecture
  with pytest.raises(FileNotFoundError, match="sd-vae-ft-ema"):
    weight_files.vae(str(tmp_path / "missing"))


def test_viewable_unnormalizes_then_decodes(small_vae):
  from configs import default
  directory, reference = small_vae
  config = default.get_config()
  config.data.update(name="latents", channels=4, image_size=4, vae_path=str(directory),
                     latent_channel_mean=(0.86488, -0.27787343, 0.21616915, 0.3738409),
                     latent_channel_std=(4.85503674, 5.31922414, 3.93725398, 3.9870003),
                     latent_scale=0.5)
  samples = np.random.default_rng(1).normal(0, 0.5, (3, 4, 4, 4)).astype(np.float32)
  z = samples / 0.5 * np.array(config.data.latent_channel_std) + np.array(
      config.data.latent_channel_mean)
  with torch.no_grad():
    expected = nhwc(reference.decode(nchw(z.astype(np.float32))).sample)
  shown = viewing.viewable(config, samples)
  assert shown.shape == (3, 16, 16, 3)
  np.testing.assert_allclose(shown, expected, atol=1e-4)
  config.data.vae_path = ""
  np.testing.assert_array_equal(viewing.viewable(config, samples), samples[..., :3])
  config.data.name = "synthetic"  # an imported latent model: its latent statistics say so
  np.testing.assert_array_equal(viewing.viewable(config, samples), samples[..., :3])
  config.data.update(name="digits", latent_channel_mean=(), latent_channel_std=())
  np.testing.assert_array_equal(viewing.viewable(config, samples), samples)
