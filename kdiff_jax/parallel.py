"""Device mesh, logical-axis rules and shardings, multi-host start-up.

One mesh with named axes ('data', 'fsdp', 'tensor'). Parameters carry logical axis names
(models annotate them with nnx.with_partitioning); `config.mesh.rules` maps each logical name
to mesh axes, e.g. ('embed', 'fsdp'). A dimension whose size does not divide by its mesh axes
is replicated instead (tiny models on big meshes), so any model runs on any mesh.
"""
import math
import os

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


def maybe_initialize_distributed(coordinator_address="", num_processes=0, process_id=-1):
  """jax.distributed.initialize() when this is one process of several.

  On a TPU VM pod (TPU_WORKER_HOSTNAMES lists several workers) JAX discovers the others
  itself. Elsewhere pass the coordinator's host:port, the number of processes and this
  process's id (main.py flags), or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. On one host with none of these it does nothing. CPU processes exchange
  collectives through gloo.
  """
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if address:
    num_processes = num_processes or int(os.environ["JAX_NUM_PROCESSES"])
    process_id = process_id if process_id >= 0 else int(os.environ["JAX_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                               process_id=process_id)
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


def mesh_shape(mesh_config, num_devices: int) -> dict:
  """Sizes of ('data', 'fsdp', 'tensor'); one of them may be -1 (all remaining devices)."""
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"mesh.data/fsdp/tensor={sizes}: each must be a positive size, at most one -1")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh: {num_devices} devices do not divide by fixed axes {sizes}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh.data*fsdp*tensor={sizes} must equal the {num_devices} devices")
  return sizes


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == jax.devices():
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def rules_dict(rules) -> dict:
  out = {}
  for rule in rules:
    name, axes = rule
    out[name] = axes
  return out


def logical_to_spec(logical: P, shape, mesh: jax.sharding.Mesh, rules: dict) -> P:
  """Map a PartitionSpec of logical names to mesh axes; replicate dims that do not divide."""
  spec, used = [], set()
  for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
    axes = rules.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(axis for axis in axes if axis not in used and mesh.shape[axis] > 1)
    if axes and dim % math.prod(mesh.shape[axis] for axis in axes) == 0:
      spec.append(axes[0] if len(axes) == 1 else axes)
      used.update(axes)
    else:
      spec.append(None)
  return P(*spec)


def tree_shardings(abstract_tree, logical_tree, mesh, rules):
  """NamedShardings for a pytree of arrays given a matching pytree of logical PartitionSpecs."""
  rules = rules_dict(rules)
  return jax.tree.map(
      lambda array, logical: NamedSharding(mesh, logical_to_spec(logical, array.shape, mesh, rules)),
      abstract_tree, logical_tree, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh, rules) -> NamedSharding:
  """Sharding of the leading (batch) dim of every input array."""
  axes = rules_dict(rules).get("batch", ("data", "fsdp"))
  return NamedSharding(mesh, P(axes))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divides(batch_size: int, mesh) -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise ValueError(f"training.batch_size={batch_size} must be divisible by the data*fsdp mesh "
                     f"axes ({shards} = {mesh.shape['data']}*{mesh.shape['fsdp']})")
  if batch_size % jax.process_count():
    raise ValueError(f"training.batch_size={batch_size} must be divisible by the "
                     f"{jax.process_count()} processes")


def describe(mesh) -> str:
  return " x ".join(f"{axis}={size}" for axis, size in mesh.shape.items())


def log_once(message: str, *args) -> None:
  if jax.process_index() == 0:
    logging.info(message, *args)
