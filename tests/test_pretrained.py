"""Released IMM checkpoints: pickles read without running them, the config they carry, and the
JAX network and sampler against the pickled PyTorch module.

tests/released/ holds stand-ins with lumalabs/imm's layout (training.preconds.IMMPrecond,
training.dit.DiT, EDM's torch_utils.persistence): a module pickled through them stores its
module's source, which `pickle.load` executes. Here the stored source writes a file and raises.
"""
import json
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from kdiff_jax import objectives, sampling, state
from kdiff_jax.export import checkpoints, pickles, pretrained

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED = os.path.join(ROOT, "tests", "released")
PAYLOAD = "open({marker!r}, 'w').write('executed')\nraise RuntimeError('stored source ran')\n"
CLASSES = 10
TINY = dict(img_resolution=8, img_channels=4, label_dim=CLASSES, model_type="DiT", patch_size=2,
            hidden_size=64, depth=2, num_heads=2, num_classes=CLASSES, class_dropout_prob=0.1,
            s_embed=True, T=0.994, eps=0.0, time_scale=1000.0, sigma_data=0.5)


@pytest.fixture(scope="module")
def preconds():
  sys.path.insert(0, RELEASED)
  from training import preconds
  yield preconds
  sys.path.remove(RELEASED)
  for name in [n for n in sys.modules if n.split(".")[0] in ("training", "torch_utils")]:
    del sys.modules[name]


def _precond(preconds, seed=0, **settings):
  """A tiny IMMPrecond with random weights (the zero-initialised ones too), in eval mode."""
  torch.manual_seed(seed)
  net = preconds.IMMPrecond(**{**TINY, **settings})
  with torch.no_grad():
    for name, value in net.named_parameters():
      if not name.endswith("pos_embed"):
        value.add_(0.05 * torch.randn_like(value))
  return net.eval()


def _pickle(net, path, marker, write=pickle.dump):
  """{'ema': net} as EDM's training loop writes it, the modules' stored source set to PAYLOAD."""
  from torch_utils import persistence
  persistence.STORED_SOURCE.update({name: PAYLOAD.format(marker=str(marker))
                                    for name in ("training.preconds", "training.dit")})
  with open(path, "wb") as f:
    write({"ema": net, "loss_fn": None, "augment_pipe": None}, f)
  return path


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickled_modules_load_without_running_their_source(preconds, tmp_path, writer):
  net = _precond(preconds)
  marker = tmp_path / "marker"
  write = pickle.dump if writer == "pickle" else torch.save
  path = _pickle(net, tmp_path / "net.pkl", marker, write)

  tree = pickles.load(str(path))
  assert not marker.exists()
  record = tree["ema"]
  assert record.qualname == "IMMPrecond" and "raise RuntimeError" in record.source
  tensors = pickles.module_tensors(record)
  expected = net.state_dict()
  assert sorted(tensors) == sorted(expected)
  for key, value in expected.items():
    assert np.array_equal(tensors[key], value.numpy()), key
  assert pickles.attribute(record, "T") == 0.994
  assert pickles.submodule(record, "model").state["_init_kwargs"]["hidden_size"] == 64

  # The control: Python's own unpickler runs the stored source.
  with pytest.raises(RuntimeError, match="stored source ran"):
    with open(path, "rb") as f:
      (pickle.load if writer == "pickle" else
       lambda f: torch.load(f, weights_only=False))(f)
  assert marker.read_text() == "executed"


def test_the_unpickler_builds_nothing_it_does_not_know(tmp_path):
  """A global outside the allowed rebuilders (here os.system) becomes a record, never a call."""
  marker = tmp_path / "marker"

  class Exploit:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  path = tmp_path / "exploit.pkl"
  path.write_bytes(pickle.dumps({"ema": Exploit()}))
  record = pickles.load(str(path))["ema"]
  assert record.qualname in ("posix.system", "os.system") and record.args == (f"touch {marker}",)
  assert not marker.exists()
  with pytest.raises(ValueError, match="not a pickled torch.nn.Module"):
    pickles.module_tensors(record)


def _jax_sample(config, net_params, noise, labels, num_steps, guidance_scale):
  config = config.copy_and_resolve_references()
  config.sampling.num_steps, config.sampling.guidance_scale = num_steps, guidance_scale
  sample = sampling.build(config, objectives.describe(config), state.build_model(config).apply)
  return np.asarray(jax.jit(sample)({"net": net_params}, noise, labels, jax.random.key(0)))


@pytest.mark.parametrize("settings", [dict(f_type="euler_fm", temb_type="stride"),
                                      dict(f_type="simple_edm", temb_type="identity")],
                         ids=["euler_fm_stride", "simple_edm_identity"])
def test_imported_pickle_samples_like_the_torch_module(preconds, tmp_path, settings):
  net = _precond(preconds, **settings)
  path = _pickle(net, tmp_path / "net.pkl", tmp_path / "marker")
  state_dict, config = pretrained.read(str(path))
  assert (config.model.name, config.model.size, config.model.patch_size) == ("dit", "T", 2)
  assert config.model.second_time_embedder and config.data.num_classes == CLASSES
  assert (config.objective.imm.f_type, config.objective.imm.time_conditioning) == (
      settings["f_type"], settings["temb_type"])
  assert (config.objective.t_max, config.objective.t_min, config.objective.noise_std) == (
      0.994, 0.0, 0.5)
  net_params = checkpoints.import_state_dict(state_dict, config)

  rng = np.random.default_rng(0)
  noise = (0.5 * rng.normal(size=(6, 8, 8, 4))).astype(np.float32)
  labels = np.arange(6) % CLASSES
  one_hot = torch.nn.functional.one_hot(torch.from_numpy(labels), CLASSES).float()
  errors = {}
  for num_steps in (1, 2, 4, 8):
    for guidance_scale in (1.0, 1.5):
      expected = preconds.pushforward(
          net, torch.from_numpy(noise).permute(0, 3, 1, 2), one_hot, num_steps,
          cfg_scale=None if guidance_scale == 1.0 else guidance_scale)
      expected = expected.permute(0, 2, 3, 1).numpy()
      got = _jax_sample(config, net_params, noise, labels, num_steps, guidance_scale)
      errors[num_steps, guidance_scale] = np.max(np.abs(got - expected))
      assert np.std(expected - noise) > 0.1
  print("max |jax - torch| by (steps, guidance):", {k: f"{v:.1e}" for k, v in errors.items()})
  assert max(errors.values()) <= 1e-5


UNET = dict(img_resolution=16, img_channels=3, label_dim=0, model_type="SongUNet",
            model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16],
            dropout=0.2, s_embed=True, f_type="simple_edm", temb_type="identity", T=0.994,
            eps=0.006, time_scale=1000.0, sigma_data=0.5)


def test_imported_songunet_pickle_samples_like_the_torch_module(preconds, tmp_path):
  """IMM's CIFAR-10 layout (cifar10.pt: torch.save of {'ema': IMMPrecond(SongUNet)}), tiny:
  unconditional, dropout (off in eval), the s-embedding, simple_edm, [0.006, 0.994]."""
  torch.manual_seed(0)
  net = preconds.IMMPrecond(**UNET)
  with torch.no_grad():
    for value in net.parameters():
      value.add_(0.05 * torch.randn_like(value))
  net.eval()
  path = _pickle(net, tmp_path / "cifar10.pt", tmp_path / "marker", torch.save)
  state_dict, config = pretrained.read(str(path))
  assert not (tmp_path / "marker").exists()
  assert (config.model.name, config.model.size, config.data.num_classes) == ("unet", "T", 0)
  assert config.model.second_time_embedder and config.model.dropout == 0.2
  assert (config.sampling.grid, config.sampling.num_steps, config.sampling.guidance_scale) == (
      "cifar", 2, 1.0)
  net_params = checkpoints.import_state_dict(state_dict, config)
  config.sampling.grid = "uniform_t"  # the stand-in's pushforward: linspace(T, eps, N + 1)
  noise = (0.5 * np.random.default_rng(0).normal(size=(4, 16, 16, 3))).astype(np.float32)
  errors = {}
  for num_steps in (1, 2, 4, 8):
    expected = preconds.pushforward(net, torch.from_numpy(noise).permute(0, 3, 1, 2), None,
                                    num_steps).permute(0, 2, 3, 1).numpy()
    got = _jax_sample(config, net_params, noise, np.zeros(4, np.int32), num_steps, 1.0)
    errors[num_steps] = np.max(np.abs(got - expected))
    assert np.std(expected - noise) > 0.1
  print("SongUNet: max |jax - torch| by steps:", {k: f"{v:.1e}" for k, v in errors.items()})
  assert max(errors.values()) <= 1e-5

  # And back: the export's IMMPrecond state_dict loads strictly into IMMPrecond(**kwargs).
  config.export.output_dir = str(tmp_path / "export")
  checkpoints.init_workdir(config, str(tmp_path / "run"), net_params)
  paths = checkpoints.export_checkpoint(config, str(tmp_path / "run"))
  with open(paths["json"]) as f:
    kwargs = json.load(f)["imm_precond"]
  reloaded = preconds.IMMPrecond(**kwargs).eval()
  reloaded.load_state_dict(torch.load(paths["imm_precond"]), strict=True)
  x = torch.from_numpy(noise).permute(0, 3, 1, 2)
  np.testing.assert_array_equal(preconds.pushforward(reloaded, x, None, 2),
                                preconds.pushforward(net, x, None, 2))


def test_imm_precond_state_dicts_go_both_ways(preconds, tmp_path):
  """The 'model.'-prefixed state_dict and the bare inner DiT's (lumalabs' DiT(...,
  class_dropout_prob=0.1).state_dict(), num_classes + 2 label rows) import (dropout row left
  out) like the pickle does; an IMM export loads into IMMPrecond(**meta['imm_precond']) with
  strict=True and samples alike."""
  net = _precond(preconds)
  state_dict, config = pretrained.read(str(_pickle(net, tmp_path / "net.pkl", tmp_path / "m")))
  from_pickle = checkpoints.import_state_dict(state_dict, config)
  precond_state = {key: value.numpy() for key, value in net.state_dict().items()}
  bare_state = {key: value.numpy() for key, value in net.model.state_dict().items()}
  for imported, table_key in ((precond_state, "model." + pretrained.LABEL_TABLE),
                              (bare_state, pretrained.LABEL_TABLE)):
    assert imported[table_key].shape == (CLASSES + 2, 64)
    jax.tree.map(np.testing.assert_array_equal, from_pickle,
                 checkpoints.import_state_dict(imported, config))
  # The rows kept are the class rows and the null row, in order.
  table = from_pickle["y_embedder"]["embedding_table"]["embedding"]
  np.testing.assert_array_equal(table, bare_state[pretrained.LABEL_TABLE][:CLASSES + 1])

  workdir, out = tmp_path / "run", tmp_path / "export"
  config.export.output_dir = str(out)
  checkpoints.init_workdir(config, str(workdir), from_pickle)
  paths = checkpoints.export_checkpoint(config, str(workdir))
  with open(paths["json"]) as f:
    meta = json.load(f)
  reloaded = preconds.IMMPrecond(**meta["imm_precond"]).eval()
  reloaded.load_state_dict(torch.load(paths["imm_precond"]), strict=True)
  rng = np.random.default_rng(1)
  noise = torch.from_numpy((0.5 * rng.normal(size=(4, 4, 8, 8))).astype(np.float32))
  one_hot = torch.nn.functional.one_hot(torch.arange(4), CLASSES).float()
  for cfg_scale in (None, 1.5):
    np.testing.assert_array_equal(preconds.pushforward(reloaded, noise, one_hot, 2, cfg_scale),
                                  preconds.pushforward(net, noise, one_hot, 2, cfg_scale))


def test_main_imports_a_pickle_and_samples_it_with_no_other_flag(preconds, tmp_path):
  marker = tmp_path / "marker"
  path = _pickle(_precond(preconds), tmp_path / "imagenet256_ts_a2.pkl", marker)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  workdir = tmp_path / "run"
  for mode in (["--mode=import", f"--import_from={path}"], ["--mode=sample"]):
    result = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", *mode], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr[-2000:]
  assert not marker.exists()
  assert "pushforward 8 steps, guidance 1.5" in result.stdout + result.stderr
  with np.load(workdir / "samples_step0_pushforward_8steps_w1.5.npz") as archive:
    images = archive[archive.files[0]]
  assert images.shape[1:] == (8, 8, 4) and np.all(np.isfinite(images))


def test_a_ddpm_network_sees_ddpm_step_k_at_alphabar_k(monkeypatch):
  """DiT's diffusion code noises step k to alphabar_k (diffusers' DDPMScheduler table, 0-indexed)
  and embeds k: our VP schedule has alphabar_k at t = (k + 1)/1000, where the network we apply
  (state.build_model) and the exported torch sampler's network must both be given k."""
  diffusers = pytest.importorskip("diffusers")
  from configs import default
  from kdiff_jax import schedules
  from kdiff_jax.export import torch_sampling
  from kdiff_jax.models import layers
  alphabar = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
  alphabar = alphabar.alphas_cumprod.double().numpy()
  steps = np.array([0, 1, 10, 250, 999])
  t = (steps + 1) / 1000.0
  np.testing.assert_allclose(schedules.get("vp").alpha(t) ** 2, alphabar[steps], rtol=1e-6)  # diffusers: float32
  np.testing.assert_allclose(torch_sampling.Schedule("vp").alpha(float(t[2])) ** 2,
                             alphabar[steps[2]], rtol=1e-6)

  config = default.get_config()
  config.model.size, config.objective.schedule = "T", "vp"
  embedded = []
  original = layers.timestep_embedding
  monkeypatch.setattr(layers, "timestep_embedding",
                      lambda time, *a, **k: embedded.append(np.asarray(time)) or original(time, *a, **k))
  model = state.build_model(config)
  net = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), model.abstract_net)
  model.apply(net, np.zeros((len(t), 8, 8, 1), np.float32), np.asarray(t, np.float32),
              np.zeros(len(t), np.int32))
  np.testing.assert_allclose(embedded[0], steps, atol=1e-3)

  seen = []

  def network(x, time, labels, s=None):
    seen.append(1000.0 * float(time[0]))
    return torch.zeros_like(x)

  torch_sampling.sample_ode(network, torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long),
                            list(t[::-1]) + [0.0], method="euler", schedule="vp",
                            prediction="eps", null_label=10)
  np.testing.assert_allclose(seen, steps[::-1], atol=1e-3)
