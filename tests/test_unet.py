"""SongUNet (kdiff_jax/models/unet.py) against its PyTorch twin (export/torch_unet.SongUNet,
whose state_dict and outputs match lumalabs/imm's SongUNet), EDM's parameter counts, the
sharding rules and configs/imm_cifar10.py."""
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import imm_cifar10, imm_cifar10_dit
from kdiff_jax import config as config_lib, data, parallel, state, train
from kdiff_jax.export import convert
from kdiff_jax.models import unet

# Two levels (16x16, 8x8), attention at 16x16 (encoder blocks, the last decoder block) and in the
# bottom's in0; labels and the s-embedding both on.
TINY = dict(input_size=16, in_channels=3, model_channels=16, channel_mult=(1, 2), num_blocks=1,
            attn_resolutions=(16,), num_classes=10, second_time_embedder=True)


@pytest.fixture(scope="module")
def torch_unet():
  pytest.importorskip("torch")
  from kdiff_jax.export import torch_unet
  return torch_unet


@pytest.fixture(scope="module")
def torch_load():
  pytest.importorskip("torch")
  from kdiff_jax.export import torch_load
  return torch_load


def _apply(graphdef, params, *args, **kwargs):
  """The merged model on args under one jit (eager dispatch is slow on a 2-core CPU)."""
  return np.asarray(jax.jit(lambda p, *a, **k: nnx.merge(graphdef, p)(*a, **k))(
      params, *args, **kwargs))


# --- parameter counts and sharding ----------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar10_model():
  """The abstract model of configs/imm_cifar10.py (DDPM++ with the s-embedding, unconditional)."""
  return state.build_model(imm_cifar10.get_config())


def test_cifar10_config_has_imms_parameter_count(cifar10_model):
  """IMM's released CIFAR-10 model: 56,061,443 parameters, 55,732,739 without the s-embedding
  (EDM's DDPM++), i.e. map_layer0_s 128·512 + 512 and map_layer1_s 512·512 + 512 more."""
  assert cifar10_model.num_params == 56_061_443
  config = imm_cifar10.get_config()
  config.model.second_time_embedder = False
  without_s = nnx.eval_shape(lambda: unet.unet_from_config(config, jnp.float32, nnx.Rngs(0)))
  assert sum(v.size for v in jax.tree.leaves(nnx.state(without_s, nnx.Param))) == 55_732_739


@pytest.mark.parametrize("fsdp", [16, 64, 256])
def test_no_large_kernel_is_replicated_on_fsdp_meshes(cifar10_model, fsdp):
  """On fsdp up to 256 (a v5e-256 as one FSDP axis) every parameter of more than
  mesh.replicated_limit elements is sharded, e.g. the decoder's [3, 3, 512, 256] convs on 512."""
  rules = parallel.rules_dict(imm_cifar10.get_config().mesh.rules)
  mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": fsdp, "tensor": 1})
  specs = jax.tree.map(lambda a, logical: types.SimpleNamespace(
      spec=parallel.logical_to_spec(logical, a.shape, mesh, rules)),
      cifar10_model.abstract_net, cifar10_model.logical_net, is_leaf=lambda x: isinstance(x, P))
  parallel.check_replicated(cifar10_model.abstract_net, specs, mesh, 1_000_000)
  assert specs["dec"]["16x16_block0"]["conv0"]["kernel"].spec == P(None, None, "fsdp", None)


# --- flax against the torch twin ------------------------------------------------------------------

def _random_twin(torch_unet):
  """The torch twin with every parameter moved by N(0, 0.1²): GroupNorm's 1 / 0 and all biases
  random too, so every layer matters."""
  import torch
  torch.manual_seed(0)
  module = torch_unet.SongUNet(**TINY).eval()
  with torch.no_grad():
    for parameter in module.parameters():
      parameter.add_(0.1 * torch.randn_like(parameter))
  return module


def test_flax_matches_the_torch_twin_and_round_trips(torch_unet):
  import torch
  module = _random_twin(torch_unet)
  state_dict = {key: value.numpy() for key, value in module.state_dict().items()}
  graphdef, params = convert.unet_from_torch(state_dict, lambda: unet.SongUNet(**TINY, rngs=nnx.Rngs(0)))
  assert sum(p.numel() for p in module.parameters()) == sum(v.size for v in jax.tree.leaves(params))

  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  t = np.array([0.994, 0.5, 0.02], np.float32)
  s = (t * rng.uniform(size=3)).astype(np.float32)
  y = np.array([3, 7, 10])  # the last is the null label: the zero one-hot
  expected = _apply(graphdef, params, x, t, y, s)
  with torch.no_grad():
    got = module(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                 torch.from_numpy(y), torch.from_numpy(s)).permute(0, 2, 3, 1).numpy()
  error = np.max(np.abs(expected - got))
  print(f"SongUNet (tiny, labels, s): max |flax - torch| = {error:.2e}, output std "
        f"{np.std(expected):.2f}")
  assert np.std(expected) > 0.1 and error <= 1e-5

  # flax -> torch names and layout -> a strict torch load -> flax: the same bits both ways.
  exported = convert.unet_to_torch(params)
  assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in state_dict.items()}
  assert all(np.array_equal(exported[k], state_dict[k]) for k in state_dict)
  module.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  _, imported = convert.unet_from_torch({k: v.numpy() for k, v in module.state_dict().items()},
                                lambda: unet.SongUNet(**TINY, rngs=nnx.Rngs(1)))
  flat, flat_imported = (jax.tree_util.tree_flatten_with_path(tree) for tree in (params, imported))
  assert flat[1] == flat_imported[1]
  for (path, value), (_, value_imported) in zip(flat[0], flat_imported[0]):
    assert np.array_equal(value, value_imported), jax.tree_util.keystr(path)
  with pytest.raises(ValueError, match="resample filter"):
    convert.unet_from_torch({**state_dict, "enc.8x8_down.conv0.resample_filter": np.ones((1, 1, 2, 2))},
                    lambda: unet.SongUNet(**TINY, rngs=nnx.Rngs(0)))


def test_export_spec_builds_the_torch_twin_of_the_config(torch_load, torch_unet):
  """convert.model_spec (as the export's JSON reads back) builds a torch module whose
  state_dict has the keys and shapes of the config's exported weights."""
  config = imm_cifar10.get_config()
  config.model.size = "T"
  spec = json.loads(json.dumps(convert.model_spec(config)))
  assert spec["num_classes"] == 0 and spec["second_time_embedder"] and spec["dropout"] == 0.2
  module = torch_load.build(spec)
  abstract = state.build_model(config).abstract_net
  exported = convert.unet_to_torch(jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract))
  assert ({k: tuple(v.shape) for k, v in module.state_dict().items()}
          == {k: v.shape for k, v in exported.items()})
  import torch
  with torch.device("meta"):
    for second_time_embedder, count in [(True, 56_061_443), (False, 55_732_739)]:
      released = torch_unet.SongUNet(second_time_embedder=second_time_embedder)
      assert sum(p.numel() for p in released.parameters()) == count


def test_resampling_is_edms_filter_convolution():
  """down: conv2d(x, F, stride 2), up: conv_transpose2d(x, 4F, stride 2), F = EDM's f ⊗ f / (Σf)²,
  padding 0, written out per filter tap."""
  x = np.random.default_rng(1).normal(size=(2, 4, 6, 3)).astype(np.float32)
  taps = unet.resample_filter()
  assert taps.shape == (2, 2)
  down = sum(taps[a, b] * x[:, a::2, b::2] for a in range(2) for b in range(2))
  up = np.zeros((2, 8, 12, 3), np.float32)
  for a in range(2):
    for b in range(2):
      up[:, a::2, b::2] = 4 * taps[a, b] * x
  np.testing.assert_allclose(unet.resample(jnp.asarray(x), "down"), down, atol=1e-6)
  np.testing.assert_array_equal(unet.resample(jnp.asarray(x), "up"), up)


def test_block_initialisation_is_edms_and_dropout_needs_a_key():
  """EDM's inits: xavier_uniform (bound √(6/(fan_in + fan_out)), fans times k²) scaled by 1 (conv0,
  skip, affine), 1e-5 (conv1, proj) or √0.2 (qkv); zero biases; GroupNorm 1 and 0."""
  block = unet.UNetBlock(8, 16, 32, resample="down", attention=True, dropout=0.5,
                         rngs=nnx.Rngs(0))
  for name, (fan_in, fan_out), scale in [
      ("conv0", (8 * 9, 16 * 9), 1.0), ("skip", (8, 16), 1.0), ("affine", (32, 16), 1.0),
      ("conv1", (16 * 9, 16 * 9), 1e-5), ("qkv", (16, 48), np.sqrt(0.2)), ("proj", (16, 16), 1e-5)]:
    layer = getattr(block, name)
    bound = scale * np.sqrt(6 / (fan_in + fan_out))
    largest = float(jnp.max(jnp.abs(layer.kernel[...])))
    assert 0.8 * bound < largest <= bound, name
    assert not np.any(np.asarray(layer.bias[...])), name
  for norm in (block.norm0, block.norm1, block.norm2):
    assert np.all(np.asarray(norm.scale[...]) == 1) and not np.any(np.asarray(norm.bias[...]))

  x = jnp.ones((200, 100))
  dropped = np.asarray(unet.dropout(x, 0.2, jax.random.key(0)))
  assert set(np.unique(dropped)) == {0.0, np.float32(1 / 0.8)}
  assert abs(np.mean(dropped == 0) - 0.2) < 0.01 and abs(dropped.mean() - 1) < 0.02
  graphdef, params = nnx.split(block)
  params = jax.tree.map(lambda p: p + 0.1, params)  # conv1 starts at 1e-5 scale
  h = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 4, 8)), jnp.float32)
  emb = jnp.ones((2, 32))
  plain = _apply(graphdef, params, h, emb)
  assert plain.shape == (2, 2, 2, 16)
  assert np.max(np.abs(_apply(graphdef, params, h, emb, jax.random.key(1)) - plain)) > 1e-3


def _recording_net(calls):
  """A network G = w·x_t that records the dropout_rng of each call."""
  def apply_fn(net, x_t, t, labels, s=None, full_precision=False, **dropout):
    calls.append(dropout.get("dropout_rng"))
    return net["w"] * x_t
  return apply_fn


@pytest.mark.parametrize("objective, dropout", [("imm", 0.2), ("flow", 0.2), ("imm", 0.0)])
def test_training_passes_get_one_dropout_key(objective, dropout):
  """With model.dropout, IMM's online and target pass get the same key (the same mask,
  docs/objectives/imm.md) and flow's one pass a key, a fourth stream of the step's rng (not the time,
  noise or label one); without, the network is called as before, with no key."""
  from kdiff_jax import objectives
  config = imm_cifar10.get_config()
  config.objective.name = objective
  config.model.dropout = dropout
  calls = []
  loss = objectives.build(config, _recording_net(calls)).loss
  batch = {"image": jnp.ones((8, 4, 4, 3)), "label": jnp.zeros(8, jnp.int32)}
  loss({"net": {"w": jnp.float32(0.5)}}, batch, jax.random.key(0))
  assert len(calls) == (2 if objective == "imm" else 1)
  if not dropout:
    assert calls == [None, None]
    return
  keys = [jax.random.key_data(key) for key in calls]
  assert all(np.array_equal(key, keys[0]) for key in keys)
  streams = jax.random.key_data(jax.random.split(jax.random.key(0), 3))
  assert not any(np.array_equal(keys[0], stream) for stream in streams)


# --- configs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"model.patch_size": 2}, r"model.patch_size=2: model.name='unet' has no patches"),
    ({"model.scan_blocks": True}, r"model.scan_blocks=True: the U-Net's blocks"),
    ({"model.size": "B"},
     r"model.size='B': allowed values for model.name='unet' are \['T', 'ddpmpp'\]"),
    ({"data.image_size": 30}, r"data.image_size=30: model.size='ddpmpp' halves the image 2 times"),
    ({"sampling.guidance_scale": 1.5}, r"sampling.guidance_scale=1.5: the network ignores labels"),
    ({"model.name": "dit", "model.size": "B", "model.patch_size": 2},
     r"model.dropout=0.2: only model.name='unet' has dropout"),
    ({"model.name": "dit", "model.size": "B", "model.patch_size": 2, "model.dropout": 0.0,
      "model.class_conditional": False},   # the legacy switch; data.num_classes=0 is the way
     r"model.class_conditional=False: model.name='dit' always embeds the label"),
])
def test_settings_a_unet_config_cannot_take(overrides, message):
  config = imm_cifar10.get_config()
  config_lib.validate(config)
  for field, value in overrides.items():
    section, name = field.split(".")
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_the_dit_variant_is_valid_and_class_conditional():
  config = imm_cifar10_dit.get_config()
  config_lib.validate(config)
  assert (config.model.name, config.model.size, config.model.patch_size) == ("dit", "B", 2)
  assert config.model.class_conditional and config.objective.label_dropout == 0.1


def test_imm_cifar10_trains_two_steps_at_tiny_size():
  """configs/imm_cifar10.py (unconditional U-Net, s-embedding, dropout 0.2) with model.size 'T'
  on synthetic 32x32x3 images: two IMM steps move the weights, the label path does not exist."""
  config = imm_cifar10.get_config()
  config.data.name = "synthetic"
  config.model.size = "T"
  config.training.batch_size = 8
  config.training.ema_decays = ()
  setup = train.setup(config, jax.devices()[:1])
  # The initial state without compiling the net's 45 random initialisers (train.init_state: ~30 s
  # on a 2-core CPU): AdamW's zero state and small random weights.
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), setup.abstract_state)
  rng = np.random.default_rng(0)
  start = jax.tree.map(lambda a: (0.05 * rng.normal(size=a.shape)).astype(a.dtype),
                       zeros["params"]["net"])
  train_state = jax.device_put({**zeros, "params": {**zeros["params"], "net": start}},
                               setup.state_shardings)
  step = train.make_train_step(setup)
  batches = data.build_iterator(config.data, global_batch_size=8, seed=0,
                                sharding=parallel.batch_sharding(setup.mesh, config.mesh.rules))
  losses = []
  for _ in range(2):
    train_state, metrics = step(train_state, next(batches))
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and losses[0] > 0
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), start,
                       jax.device_get(train_state["params"]["net"]))
  assert moved["enc"]["32x32_block0"]["conv0"]["kernel"] > 0
  assert moved["map_layer0_s"]["kernel"] > 0 and "map_label" not in moved
