"""Meshes on real TPU slices' tori, built on deviceless topologies (libtpu, no TPU; nothing is
compiled): a mesh shape that does not follow the torus's axes (the README's v5e-256 advice,
data=2 x fsdp=-1, applied to a v5p-128's 4x4x4 chips) is laid out by splitting a physical axis
with one console line, through main.py's mesh path (parallel.make_mesh) and the train state that
benchmarks/tpu_aot.py compiles (train_state.setup); one that cannot be laid out stops with one
line naming the mesh fields, the torus and the shapes that fit."""
import importlib.util
import re

import jax
import numpy as np
import pytest

from kdiff_jax import hardware, parallel, train_state
from tests.test_train import tiny_config

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                       reason="libtpu is not installed: pip install -r requirements-tpu.txt "
                              "(the TPU compiler; no TPU needed)"),
    pytest.mark.xdist_group("libtpu"),  # one process at a time may hold libtpu's lock file
]


def slice_devices(topology: str):
  return hardware.tpu_slice(topology).devices


def mesh_config(**sizes):
  config = tiny_config()
  for axis, size in {"data": 1, "fsdp": -1, "tensor": 1, **sizes}.items():
    config.mesh[axis] = size
  return config


@pytest.mark.parametrize("topology, sizes, torus, follows", [
    ("v5p:4x4x4", dict(data=2), "4x4x4", False),
    ("v5p:4x4x4", dict(data=8), "4x4x4", False),
    ("v5p:4x4x4", dict(data=4), "4x4x4", True),
    ("v4:2x2x4", dict(data=2), "2x2x4", True),
    ("v5e:16x16", dict(data=2), "16x16", True),
])
def test_every_mesh_shape_is_laid_out_on_the_torus(capfd, topology, sizes, torus, follows):
  devices = slice_devices(topology)
  config = mesh_config(**sizes)
  mesh = parallel.make_mesh(config.mesh, devices)
  expected = parallel.mesh_shape(config.mesh, len(devices))
  assert dict(mesh.shape) == expected
  # every chip once, and each data group a contiguous block of the torus's device order
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
  line = capfd.readouterr().out
  if follows:
    assert line == ""
  else:
    said = (rf"mesh data={expected['data']} x fsdp={expected['fsdp']} x tensor=1 does not follow "
            rf"the {torus} torus's axes: JAX splits a physical axis .*data=\d+ fsdp=\d+")
    assert re.search(said, line), line
    assert len(line.strip().splitlines()) == 1


def test_the_train_state_of_tpu_aot_builds_on_a_split_mesh():
  """benchmarks/tpu_aot.py --topologies=v5p:4x4x4 --config.mesh.data=2 --config.mesh.fsdp=-1
  builds its train state (the shardings it compiles with) instead of stopping in make_mesh."""
  config = mesh_config(data=2)
  config.training.batch_size = 64
  setup = train_state.setup(config, slice_devices("v5p:4x4x4"))
  assert dict(setup.mesh.shape) == {"data": 2, "fsdp": 32, "tensor": 1}
  shardings = jax.tree.leaves(setup.state_shardings["params"])
  assert all(sharding.mesh.shape == setup.mesh.shape for sharding in shardings)


def test_a_mesh_that_cannot_be_laid_out_names_the_fields_the_torus_and_what_fits(monkeypatch):
  from jax.experimental import mesh_utils

  def refuse(*args, **kwargs):
    raise NotImplementedError("Failed to find assignment for logical_axis_index 1")

  monkeypatch.setattr(mesh_utils, "create_device_mesh", refuse)
  with pytest.raises(ValueError, match=r"mesh.data/fsdp/tensor: data=2 x fsdp=32 x tensor=1 cannot "
                                       r"be laid out on the 64 devices' 4x4x4 torus .*shapes that "
                                       r"fit: data=1 fsdp=64, .*data=4 fsdp=16"):
    parallel.make_mesh(mesh_config(data=2).mesh, slice_devices("v5p:4x4x4"))


def test_devices_without_coordinates_keep_jax_make_mesh():
  mesh = parallel.make_mesh(mesh_config(data=2).mesh, jax.devices()[:8])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  np.testing.assert_array_equal(mesh.devices.flatten(), jax.devices()[:8])
