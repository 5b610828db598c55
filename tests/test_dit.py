"""DiT (kdiff_jax/models/dit.py, layers.py) against independent math and DiT's models.py."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from kdiff_jax import config as config_lib, models
from kdiff_jax.export import convert
from kdiff_jax.models import dit, layers
from tests import references

TINY = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=2,
            mlp_ratio=4.0, num_classes=10)


def _tiny(**overrides):
  kwargs = dict(TINY, second_time_embedder=False, rngs=nnx.Rngs(0))
  kwargs.update(overrides)
  return dit.DiT(**kwargs)


def _perturb(model, std=0.05, seed=1):
  """Add N(0, std²) to every parameter (so adaLN gates and the final layer are non-zero)."""
  return references.perturb(model, std, seed)


def _inputs(batch=2, size=8, channels=4, seed=0):
  kx, kt, ky, ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(kx, (batch, size, size, channels))
  t = jax.random.uniform(kt, (batch,))
  y = jax.random.randint(ky, (batch,), 0, TINY["num_classes"] + 1)  # includes the null label
  s = jax.random.uniform(ks, (batch,))
  return x, t, y, s


_call, _flat_params = references.call, references.flat_params


# --- size -------------------------------------------------------------------------------------

def test_dit_xl2_parameter_count():
  abstract = nnx.eval_shape(lambda: dit.DiT(
      input_size=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28, num_heads=16,
      mlp_ratio=4.0, num_classes=1000, second_time_embedder=False, rngs=nnx.Rngs(0)))
  count = sum(v.size for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))

  d, depth, p, channels, classes, freq = 1152, 28, 2, 4, 1000, 256
  m = 4 * d                                                   # mlp hidden
  block = (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d) + (d * 6 * d + 6 * d)
  x_embedder = p * p * channels * d + d
  t_embedder = (freq * d + d) + (d * d + d)
  y_embedder = (classes + 1) * d                              # + the null (CFG) row
  final = (d * 2 * d + 2 * d) + (d * p * p * channels + p * p * channels)
  expected = x_embedder + t_embedder + y_embedder + depth * block + final
  assert count == expected == 674_816_272
  assert abs(count - 675e6) / 675e6 < 0.005
  # torch DiT-XL/2 reports 675,129,632: it also counts the fixed pos_embed buffer (256 x 1152,
  # here a numpy constant) and learn_sigma=True doubles the final linear's outputs
  # (+ d·p·p·C + p·p·C).
  torch_count = count + 256 * d + (d * p * p * channels + p * p * channels)
  assert torch_count == 675_129_632


# --- patches ----------------------------------------------------------------------------------

def _unpatchify_loop(tokens, p, channels, h, w):
  tokens = np.asarray(tokens)
  out = np.zeros((tokens.shape[0], h * p, w * p, channels), tokens.dtype)
  for n in range(tokens.shape[0]):
    for hi in range(h):
      for wi in range(w):
        for pi in range(p):
          for qi in range(p):
            for c in range(channels):
              token, feature = hi * w + wi, (pi * p + qi) * channels + c
              out[n, hi * p + pi, wi * p + qi, c] = tokens[n, token, feature]
  return out


@pytest.mark.parametrize("h,w", [(3, 3), (2, 3)])
def test_unpatchify_matches_loop(h, w):
  p, channels = 2, 3
  tokens = np.random.default_rng(0).normal(size=(2, h * w, p * p * channels)).astype(np.float32)
  got = layers.unpatchify(jnp.asarray(tokens), p, channels, height=h)
  np.testing.assert_array_equal(np.asarray(got), _unpatchify_loop(tokens, p, channels, h, w))


def test_patchify_then_unpatchify_is_identity():
  """A patch embed whose conv copies patch entry (p, q, c) to feature (p·P + q)·C + c."""
  p, channels = 2, 3
  embed = layers.PatchEmbed(p, channels, p * p * channels, rngs=nnx.Rngs(0))
  kernel = np.zeros((p, p, channels, p * p * channels), np.float32)
  for pi in range(p):
    for qi in range(p):
      for c in range(channels):
        kernel[pi, qi, c, (pi * p + qi) * channels + c] = 1.0
  embed.proj.kernel[...] = jnp.asarray(kernel)
  x = jax.random.normal(jax.random.key(0), (2, 6, 8, channels))
  tokens = _call(embed, x)
  assert tokens.shape == (2, 3 * 4, p * p * channels)
  np.testing.assert_allclose(np.asarray(layers.unpatchify(tokens, p, channels, height=3)),
                             np.asarray(x), atol=1e-6)


# --- adaLN-Zero init --------------------------------------------------------------------------

def test_zero_output_and_identity_blocks_at_init():
  model = _tiny()
  x, t, y, _ = _inputs()
  out = _call(model, x, t, y)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.asarray(out) == 0.0)
  tokens = jax.random.normal(jax.random.key(3), (2, 16, 64))
  c = jax.random.normal(jax.random.key(4), (2, 64))
  np.testing.assert_array_equal(np.asarray(_call(model.blocks[0], tokens, c)), np.asarray(tokens))
  _perturb(model)
  perturbed = np.asarray(_call(model.blocks[0], tokens, c))
  assert not np.allclose(perturbed, np.asarray(tokens), atol=1e-4)
  assert np.abs(np.asarray(_call(model, x, t, y))).max() > 1e-4


def test_initialisation_matches_dit():
  params = _flat_params(_tiny())
  for path, v in params.items():
    name = convert.torch_name(path)
    v = np.asarray(v)
    if path[-1] == "bias" or "adaLN_modulation" in name or name.startswith("final_layer"):
      assert np.all(v == 0), name
  # xavier_uniform on torch's flattened [D, C·p·p] view of the patch conv
  kernel = np.asarray(params[("x_embedder", "proj", "kernel")])
  bound = math.sqrt(6.0 / (4 * 2 * 2 + 64))
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
  qkv = np.asarray(params[("blocks", 0, "attn", "qkv", "kernel")])
  bound = math.sqrt(6.0 / (64 + 192))
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.9 * bound
  for path in [("t_embedder", "mlp", 0, "kernel"), ("t_embedder", "mlp", 2, "kernel"),
               ("y_embedder", "embedding_table", "embedding")]:
    assert abs(np.asarray(params[path]).std() - 0.02) < 0.004, path


# --- embeddings -------------------------------------------------------------------------------

def test_2d_sincos_pos_embed_formula():
  dim, grid = 64, 4
  got = layers.get_2d_sincos_pos_embed(dim, grid)
  quarter = dim // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter) / quarter)
  expected = np.zeros((grid * grid, dim))
  for row in range(grid):
    for col in range(grid):
      i = row * grid + col
      # DiT: the first half of the channels encodes the column index, the second half the row.
      expected[i] = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                                    np.sin(row * omega), np.cos(row * omega)])
  assert got.shape == (16, 64) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert not any("pos_embed" in convert.torch_name(p) for p in _flat_params(_tiny()))


def test_timestep_embedding_formula():
  t = np.array([0.0, 0.5, 3.0, 250.0, 999.0])
  got = np.asarray(layers.timestep_embedding(jnp.asarray(t, jnp.float32)))
  half = 128
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
  expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  assert got.shape == (5, 256)
  np.testing.assert_allclose(got, expected, atol=5e-4)


@pytest.mark.parametrize("second", [False, True])
def test_forward_matches_numpy_reference(second):
  model = _perturb(_tiny(second_time_embedder=second, time_scale=500.0), std=0.2)
  x, t, y, s = _inputs()
  s = s if second else None
  got = np.asarray(_call(model, x, t, y, s))
  expected = references.dit_forward(_flat_params(model), x, t, y, s, patch=2, heads=2,
                                      time_scale=500.0)
  assert np.abs(expected).mean() > 1e-2
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_mlp_uses_tanh_gelu():
  mlp = layers.Mlp(8, 32, rngs=nnx.Rngs(0))
  v = 3.0 * np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  z = v @ np.asarray(mlp.fc1.kernel[...], np.float64)  # zero biases at init
  gelu_tanh = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
  expected = gelu_tanh @ np.asarray(mlp.fc2.kernel[...], np.float64)
  np.testing.assert_allclose(np.asarray(_call(mlp, jnp.asarray(v))), expected, rtol=1e-5, atol=1e-5)


# --- names and sharding -----------------------------------------------------------------------

def _expected_torch_keys(depth, s_embedder=False):
  """torch DiT(learn_sigma=False, class_dropout_prob > 0).state_dict() keys, minus pos_embed."""
  keys = ["x_embedder.proj.weight", "x_embedder.proj.bias",
          "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
          "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
          "y_embedder.embedding_table.weight"]
  for i in range(depth):
    for module in ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"]:
      keys += [f"blocks.{i}.{module}.weight", f"blocks.{i}.{module}.bias"]
  keys += ["final_layer.linear.weight", "final_layer.linear.bias",
           "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"]
  if s_embedder:
    keys += ["s_embedder.mlp.0.weight", "s_embedder.mlp.0.bias",
             "s_embedder.mlp.2.weight", "s_embedder.mlp.2.bias"]
  return keys


@pytest.mark.parametrize("second", [False, True])
def test_torch_names(second):
  names = [convert.torch_name(p) for p in _flat_params(_tiny(second_time_embedder=second))]
  expected = _expected_torch_keys(2, second)
  assert len(names) == len(set(names)) == len(expected)
  assert set(names) == set(expected)
  assert convert.torch_name(("blocks", 3, "attn", "qkv", "kernel")) == "blocks.3.attn.qkv.weight"
  assert (convert.torch_name(("y_embedder", "embedding_table", "embedding"))
          == "y_embedder.embedding_table.weight")


def test_logical_axis_names():
  model = _tiny(second_time_embedder=True)
  state = nnx.state(model, nnx.Param)
  specs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
  params = _flat_params(model)
  rules = dict(get_config().mesh.rules)
  allowed = {"embed", "mlp", "heads", "classes", None}
  for path, v in params.items():
    spec = tuple(specs[path].get_value())
    assert len(spec) == v.ndim, path
    assert set(spec) <= allowed, (path, spec)
    if v.ndim >= 2:
      assert any(name is not None for name in spec), path
    if path[-1] == "bias":
      kernel_spec = tuple(specs[path[:-1] + ("kernel",)].get_value())
      assert spec == kernel_spec[-1:], path
    mesh_axes = [rules[name] for name in spec if name is not None and rules[name] is not None]
    assert len(mesh_axes) == len(set(mesh_axes)), (path, spec)  # no mesh axis used twice
  expected = {
      ("x_embedder", "proj", "kernel"): (None, None, None, "embed"),
      ("t_embedder", "mlp", 0, "kernel"): (None, "embed"),
      ("t_embedder", "mlp", 2, "kernel"): ("mlp", "embed"),
      ("s_embedder", "mlp", 2, "kernel"): ("mlp", "embed"),
      ("y_embedder", "embedding_table", "embedding"): ("classes", "embed"),
      ("blocks", 1, "attn", "qkv", "kernel"): ("embed", "heads"),
      ("blocks", 1, "attn", "proj", "kernel"): ("heads", "embed"),
      ("blocks", 1, "mlp", "fc1", "kernel"): ("embed", "mlp"),
      ("blocks", 1, "mlp", "fc2", "kernel"): ("mlp", "embed"),
      ("blocks", 1, "adaLN_modulation", 1, "kernel"): ("embed", "mlp"),
      ("final_layer", "adaLN_modulation", 1, "kernel"): ("embed", "mlp"),
      ("final_layer", "linear", "kernel"): ("embed", None),
  }
  for path, spec in expected.items():
    assert tuple(specs[path].get_value()) == spec, path


# --- second time, dtype, remat ------------------------------------------------------------------

def test_second_time_embedder():
  model = _perturb(_tiny(second_time_embedder=True))
  x, t, y, s = _inputs()
  out_a = _call(model, x, t, y, s)
  out_b = _call(model, x, t, y, jnp.clip(s + 0.3, 0.0, 1.0) * 0.5)
  assert np.abs(np.asarray(out_a - out_b)).max() > 1e-4
  with pytest.raises(ValueError, match="second time embedder"):
    model(x, t, y)
  with pytest.raises(ValueError, match="no second time embedder"):
    _tiny()(x, t, y, s)


def test_bfloat16_compute_close_to_float32():
  x, t, y, _ = _inputs()
  out32 = _call(_perturb(_tiny()), x, t, y)
  model16 = _perturb(_tiny(dtype=jnp.bfloat16))
  assert all(v.dtype == jnp.float32 for v in _flat_params(model16).values())
  out16 = _call(model16, x, t, y)
  assert out16.dtype == jnp.float32
  err = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert 0.0 < err < 2e-2, err


def test_remat_same_output_and_gradients():
  x, t, y, _ = _inputs()

  def value_and_grad(model):
    graphdef, params = nnx.split(model)

    def loss(params):
      out = nnx.merge(graphdef, params)(x, t, y)
      return jnp.mean(out ** 2), out

    primitives = {eqn.primitive.name for eqn in jax.make_jaxpr(loss)(params).jaxpr.eqns}
    assert bool(primitives & {"checkpoint", "remat", "remat2"}) == (model.remat != "none")
    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, dict(nnx.to_flat_state(grads))

  out_ref, grads_ref = value_and_grad(_perturb(_tiny()))
  assert np.abs(np.asarray(grads_ref[("blocks", 0, "attn", "qkv", "kernel")].get_value())).max() > 0
  for policy in ["full", "dots"]:
    out_remat, grads_remat = value_and_grad(_perturb(_tiny(remat=policy)))
    np.testing.assert_allclose(np.asarray(out_remat), np.asarray(out_ref), rtol=1e-5, atol=1e-7)
    assert grads_ref.keys() == grads_remat.keys()
    for path in grads_ref:
      np.testing.assert_allclose(np.asarray(grads_remat[path].get_value()),
                                 np.asarray(grads_ref[path].get_value()),
                                 rtol=1e-4, atol=1e-7, err_msg=f"{policy} {path}")


# --- config -----------------------------------------------------------------------------------

def test_build_from_config():
  config = get_config()
  config.model.size = "T"
  config.model.second_time_embedder = True
  config.model.compute_dtype = "bfloat16"
  config.data.image_size, config.data.channels, config.data.num_classes = 8, 1, 10
  model = models.build(config, nnx.Rngs(0))
  assert (len(model.blocks), model.hidden_size, model.num_heads) == dit.SIZES["T"]
  assert model.dtype == jnp.bfloat16 and model.second_time_embedder
  assert _flat_params(model)[("y_embedder", "embedding_table", "embedding")].shape == (11, 64)
  x = jnp.zeros((2, 8, 8, 1))
  assert _call(model, x, jnp.zeros(2), jnp.array([0, 10]), jnp.zeros(2)).shape == x.shape

  for field, value, message in [("name", "unet", "model.name"), ("size", "XXL", "model.size"),
                                ("patch_size", 3, "model.patch_size"),
                                ("compute_dtype", "float16", "model.compute_dtype"),
                                ("remat", "some", "model.remat")]:
    bad = get_config()
    setattr(bad.model, field, value)
    with pytest.raises(ValueError, match=message):
      config_lib.validate(bad)


# --- cost -------------------------------------------------------------------------------------

def test_forward_macs_is_the_papers_and_xlas():
  """DiT-XL/2 at 32x32x4: 118.6 GMACs (Peebles & Xie, Table 4); a tiny DiT: 2 x MACs within 5%
  of XLA's FLOP count of the compiled forward (which adds the elementwise ops)."""
  xl = dit.forward_macs(input_size=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28)
  assert xl / 1e9 == pytest.approx(118.6, abs=0.05)
  model = _tiny()
  graphdef, state = nnx.split(model)
  x, t, y, _ = _inputs(batch=4)
  compiled = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args)).lower(
      state, x, t, y).compile()
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  macs = dit.forward_macs(**{k: TINY[k] for k in ("input_size", "in_channels", "patch_size",
                                                 "hidden_size", "depth", "mlp_ratio")})
  assert flops / 4 == pytest.approx(2 * macs, rel=0.05)


def test_an_unconditional_dit_trains_and_samples():
  """data.num_classes = 0: a DiT with no label table trains (loss finite, weights move, every
  batch label 0) and samples, and its samples do not depend on the labels it is handed;
  guidance is refused at start, naming sampling.guidance_scale."""
  from kdiff_jax import data, parallel, sampling, train_state
  from tests.test_train import tiny_config
  config = tiny_config()
  config.data.num_classes = 0
  config.training.ema_decays = ()
  config_lib.validate(config)
  setup = train_state.setup(config, jax.devices()[:1])
  assert "y_embedder" not in setup.abstract_state["params"]["net"]
  state = train_state.init_state(setup)
  start = jax.device_get(state["params"]["net"])
  step = train_state.make_train_step(setup)
  batches = data.build_iterator(config.data, global_batch_size=16, seed=0,
                                sharding=parallel.batch_sharding(setup.mesh, config.mesh.rules))
  for _ in range(3):
    batch = next(batches)
    assert not np.any(np.asarray(batch["label"]))
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), start,
                       jax.device_get(state["params"]["net"]))
  assert moved["final_layer"]["linear"]["kernel"] > 0

  sample = sampling.build(config, setup.objective.description, setup.model.apply)
  params = {"net": state["params"]["net"]}
  labels = sampling.cycling_labels(4, sampling.classes(config))
  np.testing.assert_array_equal(labels, 0)
  images = np.asarray(sampling.make_sampler(config, sample, setup.mesh, labels)(
      params, jax.random.key(1)))
  assert images.shape == (4, 8, 8, 2) and np.all(np.isfinite(images))
  other = np.asarray(sampling.make_sampler(config, sample, setup.mesh, np.arange(4))(
      params, jax.random.key(1)))
  np.testing.assert_array_equal(images, other)

  config.sampling.guidance_scale = 2.0
  with pytest.raises(ValueError, match=r"sampling.guidance_scale=2.0: .*data.num_classes=0"):
    config_lib.validate(config)


@pytest.mark.parametrize("name", ["dit", "jit"])
def test_an_unconditional_network_exports_to_its_torch_twin(name):
  """num_classes = 0 on both sides: no label table in the state_dict, a strict load into the
  torch twin, the same outputs whatever labels each side is given."""
  torch = pytest.importorskip("torch")
  from kdiff_jax.export import convert, torch_dit, torch_jit
  from kdiff_jax.models import jit
  if name == "dit":
    kwargs = dict(TINY, num_classes=0)
    model = _perturb(dit.DiT(**kwargs, second_time_embedder=False, rngs=nnx.Rngs(0)))
    twin = torch_dit.DiT(**kwargs)
  else:
    kwargs = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=2,
                  mlp_ratio=4.0, num_classes=0, bottleneck_dim=8, in_context_len=2,
                  in_context_start=1)
    model = _perturb(jit.JiT(**kwargs, rngs=nnx.Rngs(0)), std=0.1)
    twin = torch_jit.JiT(**kwargs, time_scale=model.time_scale)
  state_dict = convert.to_torch(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.pos_embed())
  assert not any(key.startswith("y_embedder") for key in state_dict)
  twin.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  x, t, _, _ = _inputs()
  expected = np.asarray(_call(model, x, t, jnp.array([3, 5])))
  with torch.no_grad():
    got = twin.eval()(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2),
                      torch.from_numpy(np.array(t)), torch.tensor([0, 9]))
  got = got.permute(0, 2, 3, 1).numpy()
  assert np.std(expected) > 0.05
  np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=1e-4)
