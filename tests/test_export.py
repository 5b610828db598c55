"""PyTorch export / import (kdiff_jax/export) against PyTorch modules and samplers written from
facebookresearch/DiT `models.py` and LTH14/JiT `model_jit.py` (export/torch_dit.py, torch_jit.py,
torch_sampling.py, torch_load.py)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default, imf_digits, imm_digits, meanflow_digits, tvm_digits
from kdiff_jax import checkpoint, models, objectives, parallel, sampling, schedules, state, train
from kdiff_jax.export import checkpoints, convert, weight_files
from kdiff_jax.models import dit, jit
from kdiff_jax.objectives import imm
from tests.conftest import xla_flags

# pytest-xdist runs the tests that share the digits demo on one worker.
pytestmark = pytest.mark.xdist_group("digits_fm")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIT = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=2,
           mlp_ratio=4.0, num_classes=10)
JIT = dict(input_size=8, in_channels=3, patch_size=2, hidden_size=64, depth=3, num_heads=2,
           mlp_ratio=4.0, num_classes=10, bottleneck_dim=8, in_context_len=4, in_context_start=1)


def _torch_module(name):
  pytest.importorskip("torch")
  return __import__(f"kdiff_jax.export.{name}", fromlist=[name])


@pytest.fixture(scope="module")
def torch_dit():
  return _torch_module("torch_dit")


@pytest.fixture(scope="module")
def torch_jit():
  return _torch_module("torch_jit")


@pytest.fixture(scope="module")
def torch_load():
  return _torch_module("torch_load")


@pytest.fixture(scope="module")
def torch_sampling():
  return _torch_module("torch_sampling")


def _perturb(model, std=0.05, seed=1):
  """Add N(0, std²) to every parameter, so the zero-initialised adaLN and final layers act."""
  rng = np.random.default_rng(seed)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(
      lambda p: p + jnp.asarray(std * rng.normal(size=p.shape), p.dtype), params))
  return model


def _net(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _inputs(channels, batch=3, size=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, size, size, channels)).astype(np.float32)
  t, s = rng.uniform(size=(2, batch)).astype(np.float32)
  y = np.array([1, 7, DIT["num_classes"]])[:batch]  # the last is the null label
  return x, t, y, s


def _flax_out(model, *args):
  graphdef, state = nnx.split(model)
  args = [None if a is None else jnp.asarray(a) for a in args]
  return np.asarray(jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))(state, *args))


def _torch_out(module, x, t, y, s=None):
  import torch
  with torch.no_grad():
    out = module(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                 torch.from_numpy(y), None if s is None else torch.from_numpy(s))
  return out.permute(0, 2, 3, 1).numpy()


def _load(module, state_dict):
  import torch
  module.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  return module.eval()


def _assert_bit_exact(tree_a, tree_b):
  flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(t) for t in (tree_a, tree_b))
  assert flat_a[1] == flat_b[1]
  for (path, a), (_, b) in zip(flat_a[0], flat_b[0]):
    assert np.array_equal(np.asarray(a), np.asarray(b)), path


# --- model parity and round trip ----------------------------------------------------------------

@pytest.mark.parametrize("second_time_embedder", [False, True], ids=["dit", "dit_two_times"])
def test_dit_export_matches_torch_and_round_trips(torch_dit, second_time_embedder):
  model = _perturb(dit.DiT(**DIT, second_time_embedder=second_time_embedder, rngs=nnx.Rngs(0)))
  net = _net(model)
  state_dict = convert.to_torch(net, model.pos_embed())
  module = _load(torch_dit.DiT(**DIT, second_time_embedder=second_time_embedder), state_dict)
  x, t, y, s = _inputs(DIT["in_channels"])
  s = s if second_time_embedder else None
  expected, got = _flax_out(model, x, t, y, s), _torch_out(module, x, t, y, s)
  error = np.max(np.abs(expected - got))
  print(f"DiT (second time embedder {second_time_embedder}): max |flax - torch| = {error:.2e}")
  assert np.std(expected) > 0.1 and error <= 1e-4
  _assert_bit_exact(net, convert.from_torch(state_dict, net, model.pos_embed()))


def test_jit_export_matches_torch_and_round_trips(torch_jit):
  model = _perturb(jit.JiT(**JIT, rngs=nnx.Rngs(0)), std=0.1)
  net = _net(model)
  state_dict = convert.to_torch(net, model.pos_embed())
  module = _load(torch_jit.JiT(**JIT), state_dict)
  x, t, y, _ = _inputs(JIT["in_channels"])
  expected, got = _flax_out(model, x, t, y), _torch_out(module, x, t, y)
  error = np.max(np.abs(expected - got))
  print(f"JiT: max |flax - torch| = {error:.2e}")
  assert np.std(expected) > 0.1 and error <= 1e-4
  _assert_bit_exact(net, convert.from_torch(state_dict, net, model.pos_embed()))


def test_state_dict_has_dits_keys_and_shapes(torch_dit):
  """Keys and shapes of facebookresearch/DiT's DiT(learn_sigma=False), written out by hand."""
  d, p, c, classes, tokens = DIT["hidden_size"], DIT["patch_size"], DIT["in_channels"], 10, 16
  expected = {
      "pos_embed": (1, tokens, d),
      "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
      "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
      "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
      "y_embedder.embedding_table.weight": (classes + 1, d),
      "final_layer.linear.weight": (p * p * c, d), "final_layer.linear.bias": (p * p * c,),
      "final_layer.adaLN_modulation.1.weight": (2 * d, d),
      "final_layer.adaLN_modulation.1.bias": (2 * d,),
  }
  for i in range(DIT["depth"]):
    expected.update({
        f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
        f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
        f"blocks.{i}.mlp.fc1.weight": (4 * d, d), f"blocks.{i}.mlp.fc1.bias": (4 * d,),
        f"blocks.{i}.mlp.fc2.weight": (d, 4 * d), f"blocks.{i}.mlp.fc2.bias": (d,),
        f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
        f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
    })
  model = dit.DiT(**DIT, second_time_embedder=False, rngs=nnx.Rngs(0))
  exported = convert.to_torch(_net(model), model.pos_embed())
  module = torch_dit.DiT(**DIT, learn_sigma=False)
  assert {k: v.shape for k, v in exported.items()} == expected
  assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == expected
  np.testing.assert_allclose(module.state_dict()["pos_embed"].numpy(), exported["pos_embed"],
                             atol=1e-6)
  # DiT-XL/2 (learn_sigma=True, the released checkpoints) has 675,129,632 parameters
  # including pos_embed (DiT's README / paper).
  import torch
  with torch.device("meta"):
    xl = torch_dit.DiT(input_size=32, patch_size=2, learn_sigma=True)
  assert sum(v.numel() for v in xl.state_dict().values()) == 675_129_632


# --- samplers -----------------------------------------------------------------------------------

def _sampler_setup(config):
  """(perturbed net params, the configured sampler) of config's model."""
  net = _net(_perturb(models.build(config, nnx.Rngs(0))))
  sample = sampling.build(config, objectives.describe(config), state.build_model(config).apply)
  return net, jax.jit(sample)


def _torch_sample(torch_load, torch_sampling, config, params, noise, labels):
  import torch
  description = objectives.describe(config)
  meta = dict(model=convert.model_spec(config),
              objective=checkpoints.objective_meta(config, description, {"ema": params}),
              sampling=checkpoints.sampling_meta(config, description),
              weights=dict(safetensors="ema"))
  meta = json.loads(json.dumps(meta))  # what a PyTorch user reads back
  module = _load(torch_load.build(meta["model"]), convert.net_to_torch(config, params["net"]))
  out = torch_sampling.sample(module, meta, torch.from_numpy(noise).permute(0, 3, 1, 2),
                              torch.from_numpy(labels))
  return out.permute(0, 2, 3, 1).numpy()


def _noise_and_labels(config, batch=6):
  rng = np.random.default_rng(3)
  shape = (batch, config.data.image_size, config.data.image_size, config.data.channels)
  noise = (config.objective.noise_std * rng.normal(size=shape)).astype(np.float32)
  return noise, np.arange(batch) % (config.data.num_classes + 1)


@pytest.mark.parametrize("schedule", ["rectified_flow", "cosine", "vp"])
def test_torch_schedules_and_imm_maps_match_jax(torch_sampling, schedule):
  """The host-side coefficients the PyTorch samplers use (every f_type, every schedule)."""
  jax_schedule, torch_schedule = schedules.get(schedule), torch_sampling.Schedule(schedule)
  times = np.array([0.0125, 0.3, 0.5, 0.777, 0.994])
  for name in ("alpha", "sigma", "alpha_dot", "sigma_dot"):
    expected = getattr(jax_schedule, name)(times)
    got = [getattr(torch_schedule, name)(float(t)) for t in times]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, err_msg=name)
  for f_type in imm.F_TYPES:
    for s, t in [(0.0, 0.994), (0.3, 0.5), (0.5, 0.5)]:
      # JAX evaluates the map in float32 (jnp), the PyTorch sampler on the host in float64.
      expected = imm.map_coefficients(f_type, jnp.float32(s), jnp.float32(t), jax_schedule, 0.5)
      got = torch_sampling.imm_map_coefficients(f_type, s, t, torch_schedule, 0.5)
      np.testing.assert_allclose(got, np.asarray(expected, np.float64), rtol=1e-6, atol=1e-7,
                                 err_msg=f"{f_type} s={s} t={t}")


def _assert_torch_samples_like_jax(torch_load, torch_sampling, config, what: str, tolerance):
  """The export of a random network of config samples in torch as sampling.build's JAX sampler
  does (to `tolerance`), and the samples moved away from the noise."""
  net, sampler = _sampler_setup(config)
  noise, labels = _noise_and_labels(config)
  expected = np.asarray(sampler({"net": net}, noise, labels, jax.random.key(0)))
  got = _torch_sample(torch_load, torch_sampling, config, {"net": net}, noise, labels)
  error = np.max(np.abs(expected - got))
  print(f"{what}: max error {error:.2e}")
  assert np.max(np.abs(expected - noise)) > 0.1 and error <= tolerance


@pytest.mark.parametrize("f_type, time_conditioning, guidance_scale", [
    ("euler_fm", "identity", 1.5), ("simple_edm", "stride", 1.0)])
def test_imm_pushforward_samples_match_jax(torch_load, torch_sampling, f_type, time_conditioning,
                                           guidance_scale):
  config = imm_digits.get_config()
  config.model.size = "T"
  config.objective.imm.f_type = f_type
  config.objective.imm.time_conditioning = time_conditioning
  config.sampling.guidance_scale = guidance_scale
  assert config.sampling.method == "pushforward" and config.sampling.num_steps == 4
  _assert_torch_samples_like_jax(torch_load, torch_sampling, config,
                                 f"IMM {f_type}/{time_conditioning} w={guidance_scale}, 4 steps",
                                 1e-3)


@pytest.mark.parametrize("num_steps", [1, 2])
def test_mean_flow_samples_match_jax(torch_load, torch_sampling, num_steps):
  config = meanflow_digits.get_config()
  config.model.size = "T"
  config.sampling.num_steps = num_steps
  _assert_torch_samples_like_jax(torch_load, torch_sampling, config,
                                 f"MeanFlow {num_steps} step(s)", 1e-5)


@pytest.mark.parametrize("num_steps, cfg, scale_output", [(1, 2.0, True), (2, 1.5, False),
                                                         (4, 2.0, True)])
def test_tvm_samples_match_jax(torch_load, torch_sampling, num_steps, cfg, scale_output):
  """TVM in PyTorch: x <- x + (s - t)·a·F(x, t, t - s, y, beta = 1/cfg), a = cfg with
  scale_output, against sampling.build's JAX sampler on 1, 2 and 4 steps."""
  config = tvm_digits.get_config()
  config.model.size = "T"
  config.sampling.num_steps, config.sampling.guidance_scale = num_steps, cfg
  config.objective.tvm.scale_output = scale_output
  _assert_torch_samples_like_jax(torch_load, torch_sampling, config,
                                 f"TVM {num_steps} step(s), cfg {cfg}", 1e-5)


@pytest.mark.parametrize("num_steps, omega, interval", [(1, 3.0, (0.3, 0.7)), (2, 1.5, (0.0, 1.0))])
def test_imf_samples_match_jax(torch_load, torch_sampling, num_steps, omega, interval):
  """iMF in PyTorch: z <- z - (t - r)·u(z, h = t - r, ω, interval, y), ω and the interval the
  export's sampling settings, against sampling.build's JAX sampler."""
  config = imf_digits.get_config()
  config.model.size = "T"
  config.sampling.num_steps, config.sampling.guidance_scale = num_steps, omega
  config.sampling.guidance_interval = interval
  _assert_torch_samples_like_jax(torch_load, torch_sampling, config,
                                 f"iMF {num_steps} step(s), omega {omega}, interval {interval}",
                                 1e-5)


def test_an_objective_without_a_torch_sampler_is_refused_by_name(torch_sampling):
  meta = dict(objective=dict(name="shortcut", schedule="rectified_flow"),
              sampling=dict(method="euler", times=[1.0, 0.0], t_start=1.0, t_end=0.0,
                            guidance_scale=1.0, guidance_interval=[0.0, 1.0]))
  with pytest.raises(ValueError, match="objective 'shortcut': no PyTorch sampler samples it"):
    torch_sampling.sample(None, meta, None, None)


def _ode_config(name, **objective):
  config = default.get_config()
  config.data.image_size, config.data.channels, config.data.num_classes = 8, 1, 10
  config.model.size = "T"
  config.objective.name = name
  for key, value in objective.items():
    setattr(config.objective.kdiff if key == "time_dependent" else config.objective, key, value)
  config.sampling.num_steps = 4
  return config


@pytest.mark.parametrize("config, method, w_k", [
    (_ode_config("kdiff", min_divisor=0.05, time_dependent=True), "heun", [1.5, -0.5]),
    (_ode_config("flow", schedule="cosine", prediction="v"), "euler", None),
], ids=["kdiff_k_of_t_heun", "flow_v_cosine_euler"])
def test_ode_samples_match_jax(torch_load, torch_sampling, config, method, w_k):
  config.sampling.method = method
  config.sampling.guidance_scale = 2.0
  net, sampler = _sampler_setup(config)
  params = {"net": net} if w_k is None else {"net": net, "w_k": np.asarray(w_k, np.float32)}
  noise, labels = _noise_and_labels(config)
  expected = np.asarray(sampler(params, noise, labels, jax.random.key(0)))
  got = _torch_sample(torch_load, torch_sampling, config, params, noise, labels)
  error = np.max(np.abs(expected - got))
  print(f"{config.objective.name} {method}: max error {error:.2e}")
  assert np.max(np.abs(expected - noise)) > 0.1 and error <= 1e-3


# --- checkpoints: export end to end, import to fine-tune ----------------------------------------

def test_main_export_mode_writes_files_that_sample_like_jax(torch_load, torch_sampling,
                                                            digits_fm_run, tmp_path):
  import torch
  from safetensors.numpy import load_file
  config, workdir = digits_fm_run
  env = dict(os.environ, XLA_FLAGS=xla_flags(2))
  subprocess.run([sys.executable, "main.py", "--config=configs/digits_fm.py",
                  f"--workdir={workdir}", "--mode=export",
                  f"--config.export.output_dir={tmp_path}"],
                 cwd=ROOT, env=env, check=True, timeout=300)
  with open(tmp_path / "step1500.json") as f:
    meta = json.load(f)
  assert meta["weights"] == dict(safetensors="ema", step=1500, ema="0.995")
  assert meta["model"]["name"] == "dit" and meta["objective"]["prediction"] == "velocity"
  pt = torch.load(tmp_path / "step1500.pt", weights_only=True)
  module, _ = torch_load.load(str(tmp_path / "step1500.json"))
  shapes = {k: v.shape for k, v in module.state_dict().items()}
  assert sorted(pt) == ["ema", "model"]
  for state_dict in pt.values():
    assert {k: v.shape for k, v in state_dict.items()} == shapes
  safetensors = load_file(str(tmp_path / "step1500.safetensors"))
  assert all(np.array_equal(safetensors[k], pt["ema"][k].numpy()) for k in shapes)
  read = weight_files.read_state_dict(str(tmp_path / "step1500.pt"))  # {model, ema} -> ema
  assert sorted(read) == sorted(shapes)
  assert all(np.array_equal(read[k], pt["ema"][k].numpy()) for k in shapes)
  assert not np.array_equal(pt["ema"]["blocks.0.attn.qkv.weight"],
                            pt["model"]["blocks.0.attn.qkv.weight"])

  # Modes after training without --config rebuild the run's config from the checkpoint.
  assert checkpoint.load_config(workdir).to_dict() == config.to_dict()

  # The EMA weights sample the same digits in PyTorch (Heun, 16 steps, guidance 2) as in JAX.
  weights = state.Weights(config, parallel.make_mesh(config.mesh))
  params, _ = weights.restore(workdir, use_ema=True)
  noise, labels = _noise_and_labels(config, batch=10)
  sample = sampling.build(config, weights.objective.description, weights.model.apply)
  expected = np.asarray(jax.jit(sample)(params, noise, labels, jax.random.key(0)))
  got = torch_sampling.sample(module, meta, torch.from_numpy(noise).permute(0, 3, 1, 2),
                              torch.from_numpy(labels)).permute(0, 2, 3, 1).numpy()
  error = np.max(np.abs(expected - got))
  print(f"trained digits DiT, Heun 16 steps w=2: max |jax - torch| = {error:.2e}")
  assert error <= 1e-3


def test_import_learned_sigma_dit_into_a_workdir(torch_dit, tmp_path):
  """A DiT-format learn_sigma=True .pt -> Flax params (the ε half) -> a step-0 checkpoint."""
  import torch
  config = default.get_config()
  config.data.name = "synthetic"
  config.data.image_size, config.data.channels, config.data.num_classes = 8, 4, 10
  config.model.size = "T"
  config.objective.schedule, config.objective.prediction = "vp", "eps"
  config.training.batch_size = 8
  config.checkpoint.async_save = False
  torch.manual_seed(0)
  module = torch_dit.DiT(**DIT, learn_sigma=True).eval()
  with torch.no_grad():
    for parameter in module.parameters():
      if parameter.requires_grad:
        parameter.add_(0.05 * torch.randn_like(parameter))
  path = str(tmp_path / "DiT-T-2.pt")
  torch.save(module.state_dict(), path)

  state_dict = weight_files.read_state_dict(path)
  with pytest.raises(ValueError, match="learn_sigma=True"):
    checkpoints.import_state_dict(state_dict, config)
  net = checkpoints.import_state_dict(state_dict, config, drop_learned_sigma=True)
  workdir = str(tmp_path / "finetune")
  checkpoints.init_workdir(config, workdir, net)
  setup = train.setup(config)
  mngr = checkpoint.manager(workdir, config.checkpoint)
  restored, position = checkpoint.restore(mngr, setup.abstract_state)
  mngr.close()
  assert int(restored["step"]) == 0 and position == 0
  _assert_bit_exact(net, jax.device_get(restored["params"]["net"]))
  _assert_bit_exact(net, jax.device_get(train.sampling_params(restored, config)["net"]))

  model = models.build(config, nnx.Rngs(1))
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, net)
  nnx.update(model, params)
  x, t, y, _ = _inputs(DIT["in_channels"])
  expected = _torch_out(module, x, t, y)[..., :DIT["in_channels"]]
  got = _flax_out(model, x, t, y)
  error = np.max(np.abs(expected - got))
  print(f"imported DiT (ε half of learn_sigma): max |torch - flax| = {error:.2e}")
  assert np.std(expected) > 0.1 and error <= 1e-4


def test_jax_side_imports_without_torch_and_torch_side_without_jax():
  """Every kdiff_jax module but the torch twins (export/torch_*.py) imports with torch blocked;
  the twins load and sample with jax, flax and the rest of kdiff_jax blocked."""
  blocker = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in {blocked!r} or name in {blocked!r}:
      raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""
  jax_side = blocker.format(blocked=["torch"]) + """
import pkgutil, kdiff_jax
names = [m.name for m in pkgutil.walk_packages(kdiff_jax.__path__, 'kdiff_jax.')]
twins = [name for name in names if name.startswith('kdiff_jax.export.torch_')]
assert {'kdiff_jax.export.torch_dit', 'kdiff_jax.export.torch_sampling'} <= set(twins), twins
for name in names:
  if name not in twins:
    __import__(name)
assert 'kdiff_jax.export.checkpoints' in names and 'torch' not in sys.modules
print(len(names), 'modules')
"""
  torch_side = blocker.format(blocked=["jax", "jaxlib", "flax", "optax", "orbax",
                                       "kdiff_jax.models", "kdiff_jax.export.checkpoints"]) + """
import pkgutil, torch, kdiff_jax.export
for module in pkgutil.iter_modules(kdiff_jax.export.__path__, 'kdiff_jax.export.'):
  if module.name.startswith('kdiff_jax.export.torch_'):
    __import__(module.name)
from kdiff_jax.export import torch_dit, torch_sampling

model = torch_dit.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=1,
                      num_heads=2, num_classes=10, second_time_embedder=True)
x = torch_sampling.sample_imm(model, torch.randn(2, 1, 8, 8), torch.tensor([0, 10]),
                              torch_sampling.uniform_times(2, 0.994), null_label=10)
assert x.shape == (2, 1, 8, 8) and 'jax' not in sys.modules
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for code in (jax_side, torch_side):
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
