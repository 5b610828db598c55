"""The logical-axis rules at pod scale: which dim each mesh axis shards, and the start-up check
that no large parameter ends up replicated on an FSDP mesh (worked out by hand from the shapes;
no devices needed, a mesh is only its axis sizes here)."""
import importlib
import types

import jax
import pytest
from jax.sharding import PartitionSpec as P

from configs import default
from kdiff_jax import parallel, state

RULES = parallel.rules_dict(default.get_config().mesh.rules)


def _mesh(data=1, fsdp=1, tensor=1):
  return types.SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": tensor})


@pytest.mark.parametrize("logical, shape, mesh, expected", [
    # DiT-XL's widths: 1152 = 2^7 * 9, qkv 3456 = 2^7 * 27, MLP 4608 = 2^9 * 9, adaLN 6912 = 2^8 * 27.
    (("embed", "heads"), (1152, 3456), _mesh(fsdp=128), P("fsdp", None)),
    (("embed", "heads"), (1152, 3456), _mesh(fsdp=256), P(None, None)),   # nothing divides 256
    (("embed", "mlp"), (1152, 4608), _mesh(fsdp=256), P(None, "fsdp")),   # fsdp moves to the MLP dim
    (("embed", "mlp"), (1152, 4608), _mesh(fsdp=4, tensor=2), P("fsdp", "tensor")),
    (("mlp", "embed"), (4608, 1152), _mesh(fsdp=256, tensor=2), P("tensor", None)),  # dim 0 is taken
    (("embed",), (1152,), _mesh(data=8), P(None)),                       # data never shards params
    ((None, "embed"), (28, 1152), _mesh(fsdp=256), P(None, None)),
    ((None, "mlp"), (256, 1152), _mesh(fsdp=16), P(None, None)),          # no name maps to fsdp
    (("classes", "embed"), (1001, 1152), _mesh(fsdp=16), P(None, "fsdp")),
])
def test_logical_to_spec(logical, shape, mesh, expected):
  assert parallel.logical_to_spec(P(*logical), shape, mesh, RULES) == expected


def _shardings(config, fsdp, model=None):
  """(abstract params, their shardings as objects with .spec) of a config on an fsdp mesh."""
  model = model or state.build_model(config)
  mesh = _mesh(fsdp=fsdp)
  specs = jax.tree.map(lambda a, logical: types.SimpleNamespace(
      spec=parallel.logical_to_spec(logical, a.shape, mesh, parallel.rules_dict(config.mesh.rules))),
      model.abstract_net, model.logical_net, is_leaf=lambda x: isinstance(x, P))
  return model.abstract_net, specs, mesh


IN256 = ["imm_in256", "kdiff_in256_latent", "fm_in256_latent", "kdiff_in256_pixel", "jit_in256"]


@pytest.mark.parametrize("name", IN256)
def test_no_large_parameter_replicated_on_fsdp_meshes(name):
  """On fsdp = 16, 64 and 128 (v4-32 and v5p-128 slices, a v5e-256 as data 2 x fsdp 128)
  every parameter of more than 1M elements is sharded."""
  config = importlib.import_module(f"configs.{name}").get_config()
  model = state.build_model(config)
  for fsdp in (16, 64, 128):
    abstract, specs, mesh = _shardings(config, fsdp, model)
    assert max((n for _, _, n in parallel.replicated_arrays(abstract, specs)), default=0) <= 1_000_000
    parallel.check_replicated(abstract, specs, mesh, config.mesh.replicated_limit)


def test_dit_xl_on_fsdp_256_is_refused_naming_the_arrays():
  """1152 and 3456 do not divide 256: DiT-XL's attention weights would be replicated."""
  config = importlib.import_module("configs.imm_in256").get_config()
  abstract, specs, mesh = _shardings(config, 256)
  largest = parallel.replicated_arrays(abstract, specs)[0]
  assert largest[1] == (1152, 3456) and "qkv" in largest[0]
  with pytest.raises(ValueError, match=r"mesh.replicated_limit=1000000.*qkv.*mesh.data=2"):
    parallel.check_replicated(abstract, specs, mesh, config.mesh.replicated_limit)
  config.mesh.replicated_limit = 5_000_000
  parallel.check_replicated(abstract, specs, mesh, config.mesh.replicated_limit)
