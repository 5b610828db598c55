"""JiT (kdiff_jax/models/jit.py, layers.py) against a closed-form size, numpy math and JiT's names."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from kdiff_jax import config as config_lib, models
from kdiff_jax.export import convert
from kdiff_jax.models import jit, layers
from tests import references

TINY = dict(input_size=8, in_channels=3, patch_size=2, hidden_size=64, depth=3, num_heads=2,
            mlp_ratio=4.0, num_classes=10, bottleneck_dim=8, in_context_len=4,
            in_context_start=1)


def _tiny(**overrides):
  return jit.JiT(**dict(TINY, rngs=nnx.Rngs(0), **overrides))


def _perturb(model, std=0.1, seed=1):
  """Add N(0, std²) to every parameter (adaLN gates and the final layer become non-zero)."""
  return references.perturb(model, std, seed)


def _inputs(batch=2, size=8, channels=3, seed=0):
  kx, kt, ky = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, size, size, channels))
  t = jax.random.uniform(kt, (batch,))
  y = jax.random.randint(ky, (batch,), 0, TINY["num_classes"] + 1)  # includes the null label
  return x, t, y


_call, _flat_params = references.call, references.flat_params


# --- size -------------------------------------------------------------------------------------

def _closed_form_count(depth, d, heads, bottleneck, in_context, p=16, channels=3, classes=1000,
                       freq=256, mlp_ratio=4.0):
  """Trainable parameters of model_jit.py's JiT, counted by hand."""
  head_dim = d // heads
  m = int(int(d * mlp_ratio) * 2 / 3)                        # SwiGLU hidden
  block = (d + 2 * head_dim + d                              # norm1, q_norm, k_norm, norm2
           + d * 3 * d + 3 * d + d * d + d                   # qkv, proj
           + d * 2 * m + 2 * m + m * d + d                   # w12, w3
           + d * 6 * d + 6 * d)                              # adaLN
  embed = ((freq * d + d) + (d * d + d)                      # t_embedder
           + (classes + 1) * d                               # y_embedder (+ null row)
           + p * p * channels * bottleneck                   # proj1 (no bias)
           + bottleneck * d + d                              # proj2
           + in_context * d)                                 # in_context_posemb
  final = d + (d * p * p * channels + p * p * channels) + (d * 2 * d + 2 * d)
  return embed + depth * block + final


@pytest.mark.parametrize("size, expected_millions", [("B", 131), ("L", 459), ("H", 953)])
def test_parameter_count(size, expected_millions):
  depth, d, heads, bottleneck, in_context, start = jit.SIZES[size]
  abstract = nnx.eval_shape(lambda: jit.JiT(
      input_size=256, in_channels=3, patch_size=16, hidden_size=d, depth=depth, num_heads=heads,
      mlp_ratio=4.0, num_classes=1000, bottleneck_dim=bottleneck, in_context_len=in_context,
      in_context_start=start, rngs=nnx.Rngs(0)))
  count = sum(v.size for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert count == _closed_form_count(depth, d, heads, bottleneck, in_context)
  assert round(count / 1e6) == expected_millions  # the JiT paper's B / L / H sizes
  if size == "B":
    assert count == 131_123_712


# --- RoPE -------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [0, 3])
def test_rope_is_pairwise_rotation_by_row_and_column(prefix):
  grid, head_dim = 3, 16
  x = np.random.default_rng(0).normal(size=(2, prefix + grid * grid, 2, head_dim))
  got = layers.apply_rope(jnp.asarray(x, jnp.float32), layers.rope_2d(head_dim, grid, prefix))
  np.testing.assert_allclose(np.asarray(got), references.rope(x, grid, prefix), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got[:, :prefix]), x[:, :prefix].astype(np.float32))


def test_rope_attention_logits_depend_on_relative_position_only():
  grid, head_dim = 4, 8
  rng = np.random.default_rng(1)
  q, k = rng.normal(size=head_dim), rng.normal(size=head_dim)
  rope = layers.rope_2d(head_dim, grid)

  def rotated(v, token):
    x = jnp.asarray(np.tile(v, (1, grid * grid, 1, 1)), jnp.float32)
    return np.asarray(layers.apply_rope(x, rope))[0, token, 0]

  def logit(token_q, token_k):
    return float(rotated(q, token_q) @ rotated(k, token_k))

  at = lambda row, col: row * grid + col
  assert logit(at(0, 0), at(1, 2)) == pytest.approx(logit(at(2, 1), at(3, 3)), abs=1e-4)
  assert logit(at(0, 0), at(1, 2)) != pytest.approx(logit(at(0, 0), at(2, 1)), abs=1e-3)


# --- init -------------------------------------------------------------------------------------

def test_zero_output_at_init_and_jit_initialisation():
  model = _tiny()
  x, t, y = _inputs()
  assert np.all(np.asarray(_call(model, x, t, y)) == 0.0)
  params = _flat_params(model)
  for path, v in params.items():
    name, v = convert.torch_name(path), np.asarray(v)
    if path[-1] == "bias" or "adaLN_modulation" in name or name.startswith("final_layer.linear"):
      assert np.all(v == 0), name
    if path[-1] == "scale":
      assert np.all(v == 1), name
  for path, fan_in, fan_out in [(("x_embedder", "proj1", "kernel"), 3 * 2 * 2, 8),
                                (("x_embedder", "proj2", "kernel"), 8, 64),
                                (("blocks", 0, "mlp", "w12", "kernel"), 64, 2 * 170)]:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    v = np.abs(np.asarray(params[path]))
    assert v.max() <= bound and v.max() > 0.8 * bound, path
  assert abs(np.asarray(params[("in_context_posemb",)]).std() - 0.02) < 0.005


# --- forward against numpy --------------------------------------------------------------------

def test_forward_matches_numpy_reference():
  model = _perturb(_tiny(time_scale=1.0), std=0.2)
  x, t, y = _inputs()
  got = np.asarray(_call(model, x, t, y))
  expected = references.jit_forward(_flat_params(model), x, t, y, patch=2, heads=2,
                                    in_context_len=4, in_context_start=1, time_scale=1.0)
  assert np.abs(expected).mean() > 1e-2
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_class_tokens_carry_the_label():
  """The label reaches the output through the in-context tokens even without adaLN."""
  model = _perturb(_tiny())
  x, t, _ = _inputs()
  a = _call(model, x, t, jnp.array([1, 1]))
  b = _call(model, x, t, jnp.array([2, 2]))
  assert np.abs(np.asarray(a - b)).max() > 1e-4


def test_an_unconditional_jit_is_the_conditional_one_with_a_zero_label_table():
  """num_classes = 0 builds no label table: c = t_emb alone and the class tokens are their
  position embedding alone, as a conditional JiT whose label rows are all zero; labels ignored."""
  conditional = _perturb(_tiny())
  unconditional = _tiny(num_classes=0)
  shared = [(path, value) for path, value in nnx.to_flat_state(nnx.state(conditional, nnx.Param))
            if path[0] != "y_embedder"]
  assert len(shared) == len(_flat_params(unconditional))
  nnx.update(unconditional, nnx.from_flat_state(shared))
  conditional.y_embedder.embedding_table.embedding[...] = 0.0
  x, t, y = _inputs()
  np.testing.assert_array_equal(_call(unconditional, x, t, jnp.array([3, 7])),
                                _call(conditional, x, t, y))


# --- names, axes, config ----------------------------------------------------------------------

def test_torch_names_are_jits():
  names = {convert.torch_name(p) for p in _flat_params(_tiny())}
  expected = {"in_context_posemb", "x_embedder.proj1.weight", "x_embedder.proj2.weight",
              "x_embedder.proj2.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
              "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
              "y_embedder.embedding_table.weight", "final_layer.norm_final.weight",
              "final_layer.linear.weight", "final_layer.linear.bias",
              "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
  for i in range(TINY["depth"]):
    expected |= {f"blocks.{i}.{m}" for m in [
        "norm1.weight", "norm2.weight", "attn.q_norm.weight", "attn.k_norm.weight",
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias",
        "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"]}
  assert names == expected


def test_logical_axis_names():
  model = _tiny()
  specs = dict(nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param))))
  params = _flat_params(model)
  for path, v in params.items():
    spec = tuple(specs[path].get_value())
    assert len(spec) == v.ndim and set(spec) <= {"embed", "mlp", "heads", "classes", None}, path
  expected = {
      ("x_embedder", "proj2", "kernel"): (None, None, None, "embed"),
      ("in_context_posemb",): (None, None, "embed"),
      ("blocks", 0, "norm1", "scale"): ("embed",),
      ("blocks", 0, "attn", "q_norm", "scale"): (None,),
      ("blocks", 0, "attn", "qkv", "kernel"): ("embed", "heads"),
      ("blocks", 0, "mlp", "w12", "kernel"): ("embed", "mlp"),
      ("blocks", 0, "mlp", "w3", "kernel"): ("mlp", "embed"),
      ("y_embedder", "embedding_table", "embedding"): ("classes", "embed"),
  }
  for path, spec in expected.items():
    assert tuple(specs[path].get_value()) == spec, path


def test_build_from_config_and_remat():
  config = get_config()
  config.model.name, config.model.size, config.model.time_scale = "jit", "T", 1.0
  config.data.image_size, config.data.channels, config.data.num_classes = 8, 1, 10
  model = models.build(config, nnx.Rngs(0))
  assert isinstance(model, jit.JiT) and len(model.blocks) == jit.SIZES["T"][0]
  x, t = jnp.ones((2, 8, 8, 1)), jnp.array([0.2, 0.7])
  y = jnp.array([3, 10])
  config.model.remat = "full"
  remat = _perturb(models.build(config, nnx.Rngs(0)))
  np.testing.assert_allclose(np.asarray(_call(remat, x, t, y)),
                             np.asarray(_call(_perturb(model), x, t, y)), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="no second time embedder"):
    model(x, t, y, t)
  config.model.second_time_embedder = True
  with pytest.raises(ValueError, match="model.second_time_embedder"):
    config_lib.validate(config)
  config.model.second_time_embedder, config.model.size = False, "XL"
  with pytest.raises(ValueError, match=r"model.size='XL'.*'B'"):
    config_lib.validate(config)
