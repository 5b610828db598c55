"""Pixel MeanFlow's DiT (kdiff_jax/models/pmf_dit.py): the official sizes, its 2-D RoPE, the
network's own conversion of each prediction into (u, v) against float64 NumPy, the learnable k,
the config, and its torch twin (kdiff_jax/export/torch_pmf_dit.py). Scan, sharding, bfloat16 and
sampling in torch are in tests/test_imf_dit.py's tables (parameterised by model)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from kdiff_jax.export import convert, torch_pmf_dit
from kdiff_jax.models import imf_dit, layers, pmf_dit

TINY = dict(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=2,
            head_depth=1, bottleneck_dim=8, num_classes=10)
T_FLOOR = 0.05
# Times below the floor, inside, and at t = 1 (where eps's divisor 1 - t vanishes).
TIMES = (0.02, 0.3, 0.8, 1.0)


def _model(prediction="x", seed=0, std=0.1, w_k=1.3):
  """A tiny model with every parameter moved by N(0, std²) (and, for u_k, w_k set so that
  k = sigmoid(w_k) is far from its initial 1/2)."""
  model = pmf_dit.PmfDiT(**TINY, prediction=prediction, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed + 1)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(
      lambda p: p + jnp.asarray(std * rng.normal(size=p.shape), p.dtype), params))
  if prediction == "u_k":
    model.w_k[...] = jnp.float32(w_k)
  return model


def _inputs(batch=4, seed=0):
  kx, kh, kw, ka, kb = jax.random.split(jax.random.key(seed), 5)
  z = jax.random.normal(kx, (batch, 8, 8, TINY["in_channels"]))
  t = jnp.asarray(TIMES, jnp.float32)
  y = jnp.arange(batch) % (TINY["num_classes"] + 1)
  h = t * jax.random.uniform(kh, (batch,))
  omega = 1 + 7 * jax.random.uniform(kw, (batch,))
  interval = (0.5 * jax.random.uniform(ka, (batch,)), 0.5 + 0.5 * jax.random.uniform(kb, (batch,)))
  return z, t, y, h, omega, interval


@functools.lru_cache(maxsize=None)
def _jitted(graphdef, raw):
  """(u, v) of the network, or with raw=True its heads' outputs before the conversion (iMF's
  call, which does not read t)."""
  call = imf_dit.ImfDiT.__call__ if raw else pmf_dit.PmfDiT.__call__
  return jax.jit(lambda state, z, t, y, h, omega, interval: call(
      nnx.merge(graphdef, state), z, t, y, h, guidance=omega, interval=interval, v_head=True))


def _apply(model, *args, raw=False):
  graphdef, state = nnx.split(model)
  return _jitted(graphdef, raw)(state, *args)


def _pure(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# --- sizes ------------------------------------------------------------------------------------

# Parameters of the official pmfDiT_{B,L,H}_{16,32} (Lyy-iiis/pMF models/pmfDiT.py, 1000
# classes, RGB at 256 / 512 px), read from the shapes of its Linen init (jax.eval_shape): the
# training model, and without the v head's blocks and final layer.
OFFICIAL = {("B", 16): (175_474_304, 118_234_240), ("L", 16): (511_789_696, 410_320_768),
            ("H", 16): (1_113_259_520, 954_956_032), ("B", 32): (179_312_768, 120_300_928),
            ("L", 32): (516_807_808, 412_977_280), ("H", 32): (1_119_752_192, 958_497_280)}


def _official_layer_count(depth, d, heads, aux_head_depth, p, image, classes=1000, c=3, freq=256):
  """(training model, without the v head), summed over the official modules' layers."""
  pca = 128 if d <= 1024 else 256                            # pmfDiT's bottleneck width
  num_patches, prefix = (image // p) ** 2, 8 + 4 + 2 + 2 + 4  # class, omega, t_min, t_max, time
  x_embedder = (p * p * c * pca + pca) + (pca * d + d)        # proj1, proj2: convs with bias
  timestep_embedder = (freq * d + d) + (d * d + d)            # two TorchLinear with bias
  conditioning = 4 * timestep_embedder + (classes + 1) * d + prefix * d  # + y table + tokens
  pos_embed = (prefix + num_patches) * d
  attention = 4 * d * d + 2 * (d // heads)                    # q, k, v, out (no bias); q/k norms
  swiglu = 3 * d * int(d * 8 / 3)                             # w1, w3, w2 (no bias)
  block = attention + swiglu + 2 * d + 2 * d                  # norm1, norm2, attn/mlp scales
  final_layer = d + (d * p * p * c + p * p * c)               # RMSNorm, linear with bias
  shared = depth - aux_head_depth
  total = (x_embedder + conditioning + pos_embed + (shared + 2 * aux_head_depth) * block
           + 2 * final_layer)
  return total, total - aux_head_depth * block - final_layer


@pytest.mark.parametrize("size, patch", list(OFFICIAL))
def test_parameter_counts_match_the_official_model(size, patch):
  depth, d, heads, head_depth, bottleneck = pmf_dit.SIZES[size]
  image = 16 * patch
  abstract = nnx.eval_shape(lambda: pmf_dit.PmfDiT(
      input_size=image, in_channels=3, patch_size=patch, hidden_size=d, depth=depth,
      num_heads=heads, head_depth=head_depth, bottleneck_dim=bottleneck, num_classes=1000,
      scan_blocks=True, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  count = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
  total = count(params)
  ours = (total, total - count([params["v_heads"], params["v_final_layer"]]))
  assert ours == OFFICIAL[size, patch] == _official_layer_count(depth, d, heads, head_depth,
                                                                patch, image)


# --- positions --------------------------------------------------------------------------------

def test_rope_is_the_official_2d_rotation_of_the_patch_tokens():
  """The official apply_rotary_pos_emb: pairs (x_2i, x_2i+1) as complex numbers, the first
  head_dim/4 rotated by row·f_i, the next head_dim/4 by col·f_i, f_i = θ^(-2i/(head_dim/2)),
  on the last T tokens only (the condition tokens are not rotated)."""
  model = nnx.eval_shape(lambda: pmf_dit.PmfDiT(**TINY, rngs=nnx.Rngs(0)))
  head_dim, grid, prefix = 16, 4, 20
  x = np.random.default_rng(0).normal(size=(1, prefix + grid * grid, 2, head_dim))
  z = x[..., 0::2] + 1j * x[..., 1::2]
  half = head_dim // 2
  freqs = 10000.0 ** (-np.arange(0, half, 2) / half)
  row, col = np.divmod(np.arange(grid * grid), grid)
  angle = np.concatenate([row[:, None] * freqs, col[:, None] * freqs], axis=1)
  z[:, prefix:] *= np.exp(1j * angle)[None, :, None, :]
  expected = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
  got = layers.apply_rope(jnp.asarray(x, jnp.float32), model.rope())
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


# --- the conversion, per prediction, and the torch twin -----------------------------------------

def _reference_velocity(prediction, output, z, t, k):
  """float64: x̂ from the head output o on z = (1 - t)·x + t·n, then (z - x̂)/clip(t, 0.05, 1).

  eps (o = n): x̂ = (z - t·o)/(1 - t); velocity (o = n - x): x̂ = z - t·o; u_k (o = k·x - (1-k)·n):
  solving both equations for x, x̂ = ((1 - k)·z + t·o)/((1 - t)(1 - k) + t·k); each divisor
  floored at 0.05.
  """
  output, z = np.float64(output), np.float64(z)
  t = np.float64(t)[:, None, None, None]
  x_hat = {"x": lambda: output,
           "eps": lambda: (z - t * output) / np.maximum(1 - t, T_FLOOR),
           "velocity": lambda: z - t * output,
           "u_k": lambda: ((1 - k) * z + t * output) / np.maximum((1 - t) * (1 - k) + t * k,
                                                                  T_FLOOR)}[prediction]()
  return (z - x_hat) / np.clip(t, T_FLOOR, 1.0)


def _twin(model):
  twin = torch_pmf_dit.PmfDiT(**TINY, prediction=model.prediction)
  state = {k: torch.from_numpy(v) for k, v in convert.imf_dit_to_torch(_pure(model)).items()}
  twin.load_state_dict(state, strict=True)
  return twin.eval()


@pytest.mark.parametrize("prediction", pmf_dit.PREDICTIONS)
def test_heads_are_converted_with_t_and_the_twin_agrees(prediction):
  model = _model(prediction)
  z, t, y, h, omega, interval = args = _inputs()
  raw_u, raw_v = _apply(model, *args, raw=True)
  u, v = _apply(model, *args)
  k = 1 / (1 + np.exp(-1.3)) if prediction == "u_k" else None
  for got, raw in ((u, raw_u), (v, raw_v)):
    assert float(jnp.std(raw)) > 1e-2
    np.testing.assert_allclose(got, _reference_velocity(prediction, raw, z, t, k), rtol=1e-5,
                               atol=1e-5)
  if prediction == "x":  # the official conversion, in float32, exactly
    official = (z - raw_u) / jnp.clip(t.reshape(-1, 1, 1, 1), 0.05, 1.0)
    np.testing.assert_array_equal(u, official)
    assert "w_k" not in _pure(model)
  # The network time t enters only the conversion: a new t, the same head outputs.
  raw_u2, _ = _apply(model, z, t[::-1], y, h, omega, interval, raw=True)
  np.testing.assert_array_equal(raw_u2, raw_u)

  twin = _twin(model)
  tt = lambda a: torch.from_numpy(np.array(a))
  with torch.no_grad():
    tu, tv = twin(tt(z).permute(0, 3, 1, 2), tt(t), tt(y), tt(h), guidance=tt(omega),
                  interval=(tt(interval[0]), tt(interval[1])), v_head=True)
  nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()
  scale = max(1.0, float(jnp.max(jnp.abs(u))))  # u is up to 1/0.05 times z - x̂
  np.testing.assert_allclose(nhwc(tu), u, atol=1e-5 * scale)
  np.testing.assert_allclose(nhwc(tv), v, atol=1e-5 * scale)


def test_k_is_a_trained_parameter_of_the_network():
  """prediction 'u_k': w_k gets a gradient from the output, and k = sigmoid(w_k)."""
  model = _model("u_k")
  np.testing.assert_allclose(float(model.k()), 1 / (1 + np.exp(-1.3)), rtol=1e-6)
  graphdef, params = nnx.split(model, nnx.Param)
  z, t, y, h, omega, interval = _inputs()
  loss = lambda params: jnp.mean(nnx.merge(graphdef, params)(
      z, t, y, h, guidance=omega, interval=interval) ** 2)
  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))
  assert grads["w_k"].shape == () and abs(float(grads["w_k"])) > 1e-6


# --- config and export ------------------------------------------------------------------------

def tiny_config(prediction="x"):
  """A digits config of the T-size network (objective 'flow' stands in for pMF's: the network is
  what is checked here)."""
  from configs.default import get_config
  config = get_config()
  config.data.name, config.data.image_size, config.data.channels = "digits", 8, 1
  config.data.num_classes = 10
  config.model.name, config.model.size, config.model.patch_size = "pmf_dit", "T", 2
  config.model.second_time_embedder, config.model.time_scale = True, 1.0
  config.model.prediction = prediction
  config.objective.kdiff.k_init, config.objective.kdiff.w_k_scale = 0.3, 4.0
  return config


def test_built_from_config_exported_and_loaded_by_name():
  """state.build_model applies the config's network; its export (model_spec -> torch_load,
  net_to_torch -> a strict load) gives the same u, k included (w_k starts at logit(k_init)/s)."""
  from kdiff_jax import config as config_lib, state
  from kdiff_jax.export import torch_load
  config = tiny_config("u_k")
  config_lib.validate(config)
  model = state.build_model(config)
  params = jax.jit(lambda: state.init_net(config))()
  k = jax.nn.sigmoid(4.0 * params["w_k"])
  np.testing.assert_allclose(float(k), 0.3, rtol=1e-6)
  params = jax.tree.map(lambda p: p + 0.1 * jnp.ones_like(p), params)
  z, t, y, h, omega, interval = _inputs()
  z = z[..., :1]
  u = jax.jit(lambda params, *args: model.apply(params, *args[:4], guidance=args[4],
                                                  interval=args[5]))(params, z, t, y, h, omega,
                                                                     interval)
  twin = torch_load.build(convert.model_spec(config))
  twin.load_state_dict({k: torch.from_numpy(v) for k, v in
                        convert.net_to_torch(config, params).items()}, strict=True)
  tt = lambda a: torch.from_numpy(np.array(a))
  with torch.no_grad():
    got = twin.eval()(tt(z).permute(0, 3, 1, 2), tt(t), tt(y), tt(h), guidance=tt(omega),
                      interval=(tt(interval[0]), tt(interval[1])))
  np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), u,
                             atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(u)))))


@pytest.mark.parametrize("changes, message", [
    (dict(prediction="v"), r"model.prediction='v'.*\['x', 'eps', 'velocity', 'u_k'\]"),
    (dict(t_floor=0.0), "model.t_floor"),
    (dict(size="M"), r"model.size='M'.*pmf_dit.*\['T', 'XS', 'B', 'L', 'H'\]"),
    (dict(time_scale=1000.0), "set model.time_scale=1.0"),
    (dict(schedule="cosine"), "set objective.schedule='rectified_flow'"),
    (dict(prediction="u_k", time_dependent=True), "objective.kdiff.time_dependent=False"),
    (dict(name="imf_dit", size="T", prediction="eps"),
     "model.prediction='eps': only model.name='pmf_dit'"),
    (dict(name="imf_dit", t_floor=0.1), "model.t_floor=0.1: only model.name='pmf_dit'"),
])
def test_config_refusals(changes, message):
  from kdiff_jax import config as config_lib
  config = tiny_config()
  for field, value in changes.items():
    section = {"schedule": config.objective, "time_dependent": config.objective.kdiff}.get(
        field, config.model)
    section[field] = value
  if config.model.name == "imf_dit":
    config.objective.name, config.sampling.method = "imf", "mean_flow"
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)
