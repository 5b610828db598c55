"""model.scan_blocks: stacked blocks under one lax.scan give the unrolled model's outputs and
gradients, with or without remat, and export/import in the per-block torch names."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdiff_jax.export import convert
from kdiff_jax.models import dit, jit

DIT = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=3, num_heads=2,
           mlp_ratio=2.0, num_classes=10, second_time_embedder=True)
JIT = dict(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=2,
           mlp_ratio=2.0, num_classes=10, bottleneck_dim=8, in_context_len=2, in_context_start=1)
MODELS = {"dit": (dit.DiT, DIT), "jit": (jit.JiT, JIT)}


def _pair(name, remat="none"):
  """(unrolled, scanned) models of the same perturbed parameters (a scanned model's blocks get
  the unrolled model's, stacked along a leading axis)."""
  cls, kwargs = MODELS[name]
  unrolled = cls(**kwargs, remat=remat, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  params = nnx.state(unrolled, nnx.Param)
  nnx.update(unrolled, jax.tree.map(
      lambda p: p + jnp.asarray(0.1 * rng.normal(size=p.shape), p.dtype), params))
  scanned = cls(**kwargs, remat=remat, scan_blocks=True, rngs=nnx.Rngs(2))
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, convert.stacked(nnx.to_pure_dict(nnx.state(unrolled,
                                                                              nnx.Param))))
  nnx.update(scanned, state)
  return unrolled, scanned


def _inputs(name):
  channels = MODELS[name][1]["in_channels"]
  kx, kt = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (2, 8, 8, channels))
  t = jax.random.uniform(kt, (2,))
  args = (x, t, jnp.array([3, 10]))
  return args + ((t / 2,) if name == "dit" else ())


def _value_and_grad(model, args):
  graphdef, params = nnx.split(model)

  def loss(params):
    out = nnx.merge(graphdef, params)(*args)
    return jnp.mean(out ** 2), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return out, nnx.to_pure_dict(grads)


@pytest.mark.parametrize("name,remat", [("dit", "none"), ("dit", "dots"), ("jit", "full")])
def test_scan_matches_unrolled(name, remat):
  unrolled, scanned = _pair(name, remat)
  qkv = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))["blocks"]["attn"]["qkv"]["kernel"]
  assert qkv.shape[0] == MODELS[name][1]["depth"]
  args = _inputs(name)
  out, grads = _value_and_grad(unrolled, args)
  out_scan, grads_scan = _value_and_grad(scanned, args)
  assert float(jnp.abs(out).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(out_scan), np.asarray(out), rtol=1e-5, atol=1e-6)
  flat = convert.traverse_util.flatten_dict(grads)
  flat_scan = convert.traverse_util.flatten_dict(convert.per_block(grads_scan))
  assert flat.keys() == flat_scan.keys()
  for path in flat:
    np.testing.assert_allclose(np.asarray(flat_scan[path]), np.asarray(flat[path]),
                               rtol=2e-4, atol=1e-6, err_msg=str(path))


def test_scan_has_one_loop_over_the_blocks():
  _, scanned = _pair("dit")
  graphdef, params = nnx.split(scanned)
  args = _inputs("dit")
  jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(*args))(params).jaxpr
  scans = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]
  assert len(scans) == 1 and scans[0].params["length"] == DIT["depth"]


@pytest.mark.parametrize("name", ["dit", "jit"])
def test_stacked_export_round_trip(name):
  unrolled, scanned = _pair(name)
  pos = unrolled.pos_embed()
  torch_state = convert.to_torch(nnx.to_pure_dict(nnx.state(scanned, nnx.Param)), pos)
  expected = convert.to_torch(nnx.to_pure_dict(nnx.state(unrolled, nnx.Param)), pos)
  assert torch_state.keys() == expected.keys()
  assert "blocks.2.attn.qkv.weight" in torch_state
  for key in expected:
    np.testing.assert_array_equal(torch_state[key], expected[key], err_msg=key)
  abstract = nnx.to_pure_dict(nnx.eval_shape(lambda: nnx.state(
      MODELS[name][0](**MODELS[name][1], scan_blocks=True, rngs=nnx.Rngs(0)), nnx.Param)))
  back = convert.from_torch(torch_state, abstract, pos)
  original = convert.traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(scanned, nnx.Param)))
  flat_back = convert.traverse_util.flatten_dict(back)
  assert flat_back.keys() == original.keys()
  for path in original:
    np.testing.assert_array_equal(flat_back[path], np.asarray(original[path]), err_msg=str(path))
