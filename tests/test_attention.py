"""model.attention: 'xla' is plain softmax attention (checked against numpy), every Attention of a
built network follows the field, and 'cudnn' is refused at start where it cannot run: with a JVP
objective (cuDNN's kernel has no JVP rule), in float32, or on a network without attention.
cuDNN itself needs an NVIDIA GPU: on a CPU it fails when the step is traced (tested as such)."""
import importlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import digits_fm
from kdiff_jax import config as config_lib, models, objectives, state
from kdiff_jax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _softmax_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads):
  """x [B, T, D] -> proj(softmax(q kᵀ / √d) v), float64 numpy, heads split as (3, heads, d)."""
  b, t, d_model = x.shape
  d = d_model // heads
  qkv = (x @ qkv_w + qkv_b).reshape(b, t, 3, heads, d)
  q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))   # [B, heads, T, d]
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = (p @ v).transpose(0, 2, 1, 3).reshape(b, t, d_model)
  return out @ proj_w + proj_b


def test_xla_attention_is_softmax_attention():
  rng = np.random.default_rng(0)
  attention = layers.Attention(32, 4, rngs=nnx.Rngs(0), implementation="xla")
  attention.qkv.bias[...] = jnp.asarray(rng.normal(size=96) * 0.1, jnp.float32)
  attention.proj.bias[...] = jnp.asarray(rng.normal(size=32) * 0.1, jnp.float32)
  x = rng.normal(size=(2, 9, 32)).astype(np.float32)
  params = [np.asarray(p[...], np.float64) for p in (attention.qkv.kernel, attention.qkv.bias,
                                                     attention.proj.kernel, attention.proj.bias)]
  expected = _softmax_attention(x.astype(np.float64), *params, heads=4)
  np.testing.assert_allclose(np.asarray(attention(jnp.asarray(x))), expected, rtol=1e-4, atol=1e-5)


def _config(**model):
  config = digits_fm.get_config()
  config.model.size = "T"
  for name, value in model.items():
    setattr(config.model, name, value)
  return config


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_every_attention_of_the_network_follows_the_field(scan_blocks):
  config = _config(attention="cudnn", compute_dtype="bfloat16", scan_blocks=scan_blocks)
  network = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))
  found = [m.implementation for _, m in nnx.iter_graph(network) if isinstance(m, layers.Attention)]
  assert found and set(found) == {"cudnn"}
  default = nnx.eval_shape(lambda: models.build(_config(scan_blocks=scan_blocks), nnx.Rngs(0)))
  assert {m.implementation for _, m in nnx.iter_graph(default)
          if isinstance(m, layers.Attention)} == {"xla"}


JVP_OBJECTIVES = [name for name, method in objectives.MODULES.items()
                  if getattr(method, "JVP", False)]


def test_the_objectives_that_differentiate_the_network_forward_say_so():
  assert JVP_OBJECTIVES == ["meanflow", "imf", "pmf", "tvm"]


@pytest.mark.parametrize("objective", JVP_OBJECTIVES)
def test_a_jvp_objective_with_cudnn_is_refused_naming_both_fields(objective):
  config = _config(attention="cudnn", compute_dtype="bfloat16")
  config.objective.name = objective
  with pytest.raises(ValueError, match=re.escape("model.attention='cudnn'") + ".*"
                     + re.escape(f"objective.name={objective!r}")):
    objectives.check(config)
  models.check(config)   # the network itself may use it
  demo = os.path.join(ROOT, "configs", f"{objective}_digits.py")
  if os.path.exists(demo):
    # its valid demo config with cudnn fails the whole start-up check on this field (iMF's
    # in-context DiT has no attention choice at all: models.check says so first)
    config = importlib.import_module(f"configs.{objective}_digits").get_config()
    config_lib.validate(config)
    config.model.attention, config.model.compute_dtype = "cudnn", "bfloat16"
    with pytest.raises(ValueError, match=re.escape("model.attention='cudnn'")):
      config_lib.validate(config)


@pytest.mark.parametrize("model, message", [
    (dict(attention="cudnn"), r"model.attention='cudnn' runs in half precision only.*"
                              r"model.compute_dtype='bfloat16'"),
    (dict(attention="flash"), r"model.attention='flash'.*\['xla', 'cudnn'\]"),
])
def test_bad_attention_fails_at_start(model, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(_config(**model))


def test_cudnn_needs_an_nvidia_gpu():
  """On this CPU the cuDNN kernel is absent: the field is accepted, the bfloat16 pass fails when
  traced, and a float32 pass (IMM's full-precision target) runs the XLA path."""
  config = _config(attention="cudnn", compute_dtype="bfloat16")
  config_lib.validate(config)
  x = jnp.ones((2, 16, 32))
  half = layers.Attention(32, 2, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, implementation="cudnn")
  full = layers.Attention(32, 2, rngs=nnx.Rngs(0), implementation="cudnn")
  reference = layers.Attention(32, 2, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(full(x)), np.asarray(reference(x)))
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present: cuDNN may run")
  with pytest.raises(RuntimeError, match="cuDNN"):
    half(x)
  model = state.build_model(config)
  assert model.num_params > 0   # builds abstractly; only running it needs the GPU
