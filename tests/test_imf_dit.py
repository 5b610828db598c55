"""The iMF DiT (kdiff_jax/models/imf_dit.py): official sizes, token layout, heads, scan, sharding,
and its torch twin (kdiff_jax/export/torch_imf_dit.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from kdiff_jax import parallel
from kdiff_jax.export import convert, torch_imf_dit, torch_sampling
from kdiff_jax.models import imf_dit, layers

TINY = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=3, num_heads=2,
            head_depth=1, num_classes=10)
# Condition token rows of the sequence, in order: class 0-7, ω 8-11, t_min 12-13, t_max 14-15, h 16-19.
ROWS = {"y": range(0, 8), "guidance": range(8, 12), "t_min": range(12, 14),
        "t_max": range(14, 16), "s": range(16, 20)}


def _model(seed=0, std=0.1, **overrides):
  """A tiny model with every parameter moved by N(0, std²) (the zero-initialised residual scales
  and final layers become non-zero)."""
  model = imf_dit.ImfDiT(**dict(TINY, **overrides), rngs=nnx.Rngs(seed))
  if std:
    rng = np.random.default_rng(seed + 1)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(
        lambda p: p + jnp.asarray(std * rng.normal(size=p.shape), p.dtype), params))
  return model


def _inputs(batch=4, seed=0):
  kx, kh, kw, ka, kb = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(kx, (batch, 8, 8, TINY["in_channels"]))
  y = jnp.arange(batch) % (TINY["num_classes"] + 1)          # includes the null label
  h = jax.random.uniform(kh, (batch,))
  omega = 1 + 7 * jax.random.uniform(kw, (batch,))
  interval = (0.5 * jax.random.uniform(ka, (batch,)), 0.5 + 0.5 * jax.random.uniform(kb, (batch,)))
  return x, y, h, omega, interval


@functools.lru_cache(maxsize=None)
def _jitted_apply(graphdef, v_head):
  """One compiled forward per model structure: the tests' perturbed copies reuse it."""
  return jax.jit(lambda state, *args: nnx.merge(graphdef, state)(
      *args[:3], s=args[3], guidance=args[4], interval=args[5], v_head=v_head))


def _apply(model, x, y, h, omega, interval, v_head=True, t=None):
  graphdef, state = nnx.split(model)
  t = jnp.zeros(x.shape[0]) if t is None else t
  return _jitted_apply(graphdef, v_head)(state, x, t, y, h, omega, interval)


def _pure(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# --- sizes ------------------------------------------------------------------------------------

# Parameter counts of the official imfDiT_{B,M,L,XL}_2 (Lyy-iiis/imeanflow models/imfDiT.py,
# num_classes 1000, 32x32x4 latents), from the shapes of its Linen init (jax.eval_shape): the
# training model, and without the v head's blocks and final layer (the 89M / 409M / 610M of
# the paper, what one-step sampling runs).
OFFICIAL = {"B": (145_596_960, 88_935_184), "M": (230_570_016, 173_908_240),
            "L": (509_752_352, 409_054_224), "XL": (711_113_760, 610_415_632)}


def _closed_form(depth, d, heads, head_depth, classes=1000, p=2, channels=4, freq=256):
  """Parameters of the training model, counted by hand (head_dim norms, SwiGLU int(8/3·D))."""
  m = int(int(4 * d) * 2 / 3)
  block = 4 * d * d + 3 * d * m + 2 * d + 2 * (d // heads) + 2 * d  # attn, mlp, norms, scales
  final = d + d * p * p * channels + p * p * channels
  embed = (p * p * channels * d + d + 4 * (freq * d + d + d * d + d) + (classes + 1) * d
           + 20 * d)                                                # patch, 4 scalars, label, tokens
  return embed + (depth + head_depth) * block + 2 * final, block * head_depth + final


@pytest.mark.parametrize("size, millions", [("B", 89), ("M", 174), ("L", 409), ("XL", 610)])
def test_parameter_counts_match_the_official_model(size, millions):
  depth, d, heads, head_depth = imf_dit.SIZES[size]
  abstract = nnx.eval_shape(lambda: imf_dit.ImfDiT(
      input_size=32, in_channels=4, patch_size=2, hidden_size=d, depth=depth, num_heads=heads,
      head_depth=head_depth, num_classes=1000, scan_blocks=True, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))  # stacked blocks: quick to trace
  count = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
  total, v_part = count(params), count([params["v_heads"], params["v_final_layer"]])
  assert (total, total - v_part) == OFFICIAL[size]
  assert (total, v_part) == _closed_form(depth, d, heads, head_depth)
  assert round((total - v_part) / 1e6) == millions


# --- layout and heads -------------------------------------------------------------------------

def test_rope_is_the_complex_rotation_of_consecutive_pairs():
  """The official RoPE: view (x_2i, x_2i+1) as x_2i + i·x_2i+1, multiply by exp(i·p·θ^(-2i/d))."""
  seq, head_dim = 7, 8
  x = np.random.default_rng(0).normal(size=(1, seq, 2, head_dim)).astype(np.float32)
  z = x[..., 0::2] + 1j * x[..., 1::2]
  freqs = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
  z = z * np.exp(1j * np.arange(seq)[:, None] * freqs)[None, :, None, :]
  expected = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
  got = layers.apply_rope(jnp.asarray(x), imf_dit.rope_1d(head_dim, seq))
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_each_condition_moves_only_its_own_tokens():
  model = _model()
  _, y, h, omega, (t_min, t_max) = _inputs()
  base = dict(y=y, h=h, omega=omega, t_min=t_min, t_max=t_max)
  graphdef, state = nnx.split(model)
  condition_tokens = jax.jit(lambda state, kw: nnx.merge(graphdef, state).condition_tokens(**kw))
  tokens = lambda **kw: np.asarray(condition_tokens(state, dict(base, **kw)))
  reference = tokens()
  assert reference.shape == (4, 20, TINY["hidden_size"])
  changes = {"y": dict(y=(y + 1) % 10), "guidance": dict(omega=omega + 1.0),
             "t_min": dict(t_min=t_min + 0.1), "t_max": dict(t_max=t_max - 0.1),
             "s": dict(h=h + 0.1)}
  for name, change in changes.items():
    moved = np.any(tokens(**change) != reference, axis=(0, 2))
    assert np.flatnonzero(moved).tolist() == list(ROWS[name]), name


def test_guidance_enters_as_one_minus_one_over_omega():
  model = _model()
  _, y, h, omega, (t_min, t_max) = _inputs()
  tokens = np.asarray(model.condition_tokens(y, h, omega, t_min, t_max))
  expected = (np.asarray(model.omega_tokens[...])[None]
              + np.asarray(model.omega_embedder(1 - 1 / omega))[:, None])
  np.testing.assert_allclose(tokens[:, 8:12], expected, rtol=1e-6)


def test_label_change_moves_its_row_and_time_t_is_not_an_input():
  model = _model()
  x, y, h, omega, interval = _inputs()
  u, v = _apply(model, x, y, h, omega, interval)
  assert np.all(np.isfinite(u)) and float(jnp.std(u)) > 1e-3
  # The network time t does not enter (only h = t - r does): bitwise the same outputs.
  u_t, v_t = _apply(model, x, y, h, omega, interval, t=jnp.full((4,), 0.7))
  np.testing.assert_array_equal(u_t, u)
  np.testing.assert_array_equal(v_t, v)
  # Changing example 0's label moves example 0's u and v, and nothing of the other rows.
  u_y, v_y = _apply(model, x, y.at[0].set(5), h, omega, interval)
  for new, old in ((u_y, u), (v_y, v)):
    assert float(jnp.max(jnp.abs(new[0] - old[0]))) > 1e-3
    np.testing.assert_array_equal(new[1:], old[1:])


def test_heads_share_the_trunk_and_nothing_else():
  model = _model()
  args = _inputs()
  u, v = _apply(model, *args)
  np.testing.assert_allclose(_apply(model, *args, v_head=False), u, rtol=1e-6, atol=1e-7)
  graphdef, state = nnx.split(model)
  v_only = jax.jit(lambda state, x, y, h, omega, interval: nnx.merge(graphdef, state)(
      x, None, y, h, guidance=omega, interval=interval, v_head=True, u_head=False))(state, *args)
  np.testing.assert_allclose(v_only, v, rtol=1e-6, atol=1e-7)
  assert float(jnp.max(jnp.abs(u - v))) > 1e-3
  for part, moves_u, moves_v in (("v_heads", False, True), ("v_final_layer", False, True),
                                 ("u_heads", True, False), ("shared_blocks", True, True)):
    moved = _model()
    sub = getattr(moved, part)
    sub_params = nnx.state(sub, nnx.Param)
    nnx.update(sub, jax.tree.map(lambda p: p + 0.05, sub_params))
    u2, v2 = _apply(moved, *args)
    assert (not np.array_equal(u2, u)) == moves_u, part
    assert (not np.array_equal(v2, v)) == moves_v, part


def test_zero_output_at_initialisation():
  model = _model(std=0.0)
  u, v = _apply(model, *_inputs())
  assert not np.any(np.asarray(u)) and not np.any(np.asarray(v))


def test_bfloat16_compute_stays_close_to_float32():
  model32 = _model()
  model16 = imf_dit.ImfDiT(**TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  nnx.update(model16, nnx.state(model32, nnx.Param))
  args = _inputs()
  u32, _ = _apply(model32, *args)
  u16, v16 = _apply(model16, *args)
  assert u16.dtype == jnp.float32 and v16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(u16 - u32))) < 0.05 * float(jnp.max(jnp.abs(u32)))


# --- scan and sharding ------------------------------------------------------------------------

def test_scan_matches_unrolled(remat="dots"):
  unrolled = _model(remat=remat)
  scanned = imf_dit.ImfDiT(**TINY, remat=remat, scan_blocks=True, rngs=nnx.Rngs(2))
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, convert.stacked(_pure(unrolled), imf_dit.STACKS))
  nnx.update(scanned, state)
  assert _pure(scanned)["shared_blocks"]["attn"]["q_proj"]["kernel"].shape[0] == 2
  assert _pure(scanned)["u_heads"]["mlp"]["w1"]["kernel"].shape[0] == 1
  args = _inputs()

  def value_and_grad(model):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
      u, v = nnx.merge(graphdef, params)(args[0], None, *args[1:3], guidance=args[3],
                                         interval=args[4], v_head=True)
      return jnp.mean(u ** 2) + jnp.mean(jnp.sin(v)), (u, v)

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, nnx.to_pure_dict(grads)

  (u1, v1), g1 = value_and_grad(unrolled)
  (u2, v2), g2 = value_and_grad(scanned)
  np.testing.assert_allclose(u2, u1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v2, v1, rtol=1e-5, atol=1e-6)
  g1 = convert.stacked(g1, imf_dit.STACKS)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # Both layouts export the same torch state_dict.
  torch1, torch2 = convert.imf_dit_to_torch(_pure(unrolled)), convert.imf_dit_to_torch(_pure(scanned))
  assert torch1.keys() == torch2.keys()
  assert all(np.array_equal(torch1[k], torch2[k]) for k in torch1)


def test_one_device_equals_eight_sharded():
  """Parameters sharded by their logical names on data 2 x fsdp 2 x tensor 2, activations on the
  batch axes: the same u and v as on one device."""
  assert len(jax.devices()) == 8
  model = _model(scan_blocks=True, hidden_size=64)
  args = _inputs(batch=8)
  u1, v1 = _apply(model, *args)
  graphdef, params = nnx.split(model, nnx.Param)
  logical = nnx.get_partition_spec(params)
  mesh = jax.make_mesh((2, 2, 2), parallel.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"))
  shardings = parallel.tree_shardings(nnx.to_pure_dict(params), nnx.to_pure_dict(logical), mesh,
                                      rules)
  placed = jax.device_put(nnx.to_pure_dict(params), shardings)
  q = placed["shared_blocks"]["attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  batch = parallel.batch_sharding(mesh, rules)
  x, y, h, omega, (t_min, t_max) = jax.device_put(args, batch)

  def run(params, x, y, h, omega, t_min, t_max):
    with parallel.activations_on(mesh, rules):
      net = nnx.merge(graphdef, params)
      return net(x, None, y, s=h, guidance=omega, interval=(t_min, t_max), v_head=True)

  u8, v8 = jax.jit(run)(placed, x, y, h, omega, t_min, t_max)
  assert u8.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(u8, u1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v8, v1, rtol=1e-5, atol=1e-6)


# --- torch twin -------------------------------------------------------------------------------

def _torch_twin(model):
  twin = torch_imf_dit.ImfDiT(**{k: v for k, v in TINY.items()})
  state = {k: torch.from_numpy(v) for k, v in convert.imf_dit_to_torch(_pure(model)).items()}
  twin.load_state_dict(state, strict=True)
  return twin.eval()


def test_torch_twin_loads_strictly_and_matches():
  model = _model()
  twin = _torch_twin(model)
  assert set(twin.state_dict()) == set(convert.imf_dit_to_torch(_pure(model)))
  x, y, h, omega, interval = _inputs()
  u, v = _apply(model, x, y, h, omega, interval)
  nchw = lambda a: torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2)
  tt = lambda a: torch.from_numpy(np.asarray(a))
  with torch.no_grad():
    tu, tv = twin(nchw(x), None, tt(y), tt(h), guidance=tt(omega),
                  interval=(tt(interval[0]), tt(interval[1])), v_head=True)
    tu_only = twin(nchw(x), None, tt(y), tt(h), guidance=tt(omega),
                   interval=(tt(interval[0]), tt(interval[1])))
  to_nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(to_nhwc(tu), u, atol=1e-5)
  np.testing.assert_allclose(to_nhwc(tv), v, atol=1e-5)
  np.testing.assert_allclose(to_nhwc(tu_only), u, atol=1e-5)


@pytest.mark.parametrize("num_steps", [1, 2])
def test_torch_twin_samples_the_same(num_steps):
  """z <- z - (t - r)·u(z, h = t - r, ω, interval, y) on linspace(1, 0, N + 1), in both."""
  model = _model()
  twin = _torch_twin(model)
  noise = jax.random.normal(jax.random.key(5), (4, 8, 8, 4))
  labels = jnp.array([0, 3, 7, 10])
  omega, interval = 3.0, (0.3, 0.7)
  graphdef, state = nnx.split(model)
  times = np.linspace(1.0, 0.0, num_steps + 1)
  z = noise
  for t, r in zip(times[:-1], times[1:]):
    h = jnp.full((4,), t, jnp.float32) - jnp.full((4,), r, jnp.float32)
    u = nnx.merge(graphdef, state)(z, jnp.full((4,), t), labels, s=h, guidance=omega,
                                   interval=interval)
    z = z - h[:, None, None, None] * u
  torch_z = torch_sampling.sample_mean_flow(
      twin, torch.from_numpy(np.asarray(noise)).permute(0, 3, 1, 2),
      torch.from_numpy(np.asarray(labels)), times, guidance=omega, interval=interval)
  np.testing.assert_allclose(torch_z.permute(0, 2, 3, 1).numpy(), z, atol=1e-5)
  assert float(jnp.max(jnp.abs(z - noise))) > 1e-3


# --- config -----------------------------------------------------------------------------------

def tiny_config():
  from configs.default import get_config
  config = get_config()
  config.data.name, config.data.image_size, config.data.channels = "digits", 8, 1
  config.data.num_classes = 10
  config.model.name, config.model.size, config.model.patch_size = "imf_dit", "T", 2
  config.model.second_time_embedder, config.model.time_scale = True, 1.0
  config.objective.name, config.objective.schedule = "imf", "rectified_flow"
  config.sampling.method = "mean_flow"
  return config


def test_built_from_config_and_applied_through_state():
  from kdiff_jax import config as config_lib, state
  config = tiny_config()
  config_lib.validate(config)
  model = state.build_model(config)
  depth, hidden, _, head_depth = imf_dit.SIZES["T"]
  assert model.abstract_net["u_heads"][0]["attn_scale"].shape == (hidden,)
  assert len(model.abstract_net["shared_blocks"]) == depth - head_depth
  assert model.logical_net["v_heads"][0]["mlp"]["w2"]["kernel"] == jax.sharding.PartitionSpec(
      "mlp", "embed")
  direct = _model(hidden_size=hidden, depth=depth, head_depth=head_depth, in_channels=1)
  x, y, h, omega, interval = _inputs()
  x = x[..., :1]
  u, v = model.apply(_pure(direct), x, jnp.ones(4), y, s=h, guidance=omega, interval=interval,
                     v_head=True)
  u_direct, v_direct = _apply(direct, x, y, h, omega, interval)
  np.testing.assert_allclose(u, u_direct, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v, v_direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("model.time_scale", 1000.0, "model.time_scale=1000.0.*set model.time_scale=1.0"),
    ("model.second_time_embedder", False, "set model.second_time_embedder=True"),
    ("objective.name", "flow", "sampling.method='mean_flow': objective.name='flow' samples with"),
    ("model.size", "S", r"model.size='S'.*imf_dit.*\['T', 'XS', 'B', 'M', 'L', 'XL'\]"),
])
def test_config_refusals(field, value, message):
  from kdiff_jax import config as config_lib
  config = tiny_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_export_spec_and_state_dict_build_the_twin():
  """export.convert: model_spec -> torch_load.build, net_to_torch -> a strict load, and the
  twin gives the JAX network's u."""
  from kdiff_jax.export import torch_load
  config = tiny_config()
  depth, hidden, _, head_depth = imf_dit.SIZES["T"]
  model = _model(hidden_size=hidden, depth=depth, head_depth=head_depth, in_channels=1)
  twin = torch_load.build(convert.model_spec(config))
  state = {k: torch.from_numpy(v) for k, v in convert.net_to_torch(config, _pure(model)).items()}
  twin.load_state_dict(state, strict=True)
  x, y, h, omega, interval = _inputs()
  x = x[..., :1]
  u = _apply(model, x, y, h, omega, interval, v_head=False)
  tt = lambda a: torch.from_numpy(np.array(a))
  with torch.no_grad():
    got = twin.eval()(tt(x).permute(0, 3, 1, 2), None, tt(y), tt(h), guidance=tt(omega),
                      interval=(tt(interval[0]), tt(interval[1])))
  np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), u, atol=1e-5)
