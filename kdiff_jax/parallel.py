"""Device mesh, logical-axis rules and shardings, multi-host start-up.

One mesh with named axes ('data', 'fsdp', 'tensor'), laid out on the hardware by JAX
(`jax.make_mesh`: TPU devices in the physical order of the ICI torus); with mesh.dcn_data > 1
slices the data axis runs across that many TPU slices over the data-centre network
(`mesh_utils.create_hybrid_device_mesh`; MaxText's dcn_data_parallelism). Parameters carry
logical axis names (models annotate them with nnx.with_partitioning); `config.mesh.rules` maps
each logical name to mesh axes, e.g. ('embed', 'fsdp'). A mesh axis whose dimension does not
divide goes to another dimension of the same array that does (DiT-XL's width 1152 does not
divide 256, its MLP's 4608 does), and a dimension nothing divides is replicated (tiny models
on big meshes). A parameter of more than mesh.replicated_limit elements that stays replicated on a
mesh with fsdp > 1 stops the run, naming it (`check_replicated`). The batch (the leading dim of
every input) is split over the axes the rule 'batch' names; `check_batch` is the one check that
a global batch splits evenly over them, the processes and the objective's particle groups.
"""
import contextlib
import contextvars
import math
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kdiff_jax.schema import Rule, number, one_of

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_BATCH_AXES = ("data", "fsdp")
# mesh.gather_weights: 'once' (`gathered_once`: each weight all-gathered once per step and held
# through it) or 'per_call' (the compiler gathers where each network call uses a weight)
GATHER_WEIGHTS = ("once", "per_call")


def _axes_tuple(axes) -> tuple:
  """None | 'axis' | ('axis', ...) -> a tuple of axis names."""
  return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def _is_rules(value) -> bool:
  return isinstance(value, tuple) and all(
      isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)
      and (rule[1] is None or isinstance(rule[1], (str, tuple)))
      and all(axis in MESH_AXES for axis in _axes_tuple(rule[1]))
      for rule in value)


RULES = {
    "mesh.data": number(-1, integer=True, note="-1 = the remaining devices; not 0"),
    "mesh.fsdp": number(-1, integer=True, note="-1 = the remaining devices; not 0"),
    "mesh.tensor": number(-1, integer=True, note="-1 = the remaining devices; not 0"),
    "mesh.dcn_data": number(1, integer=True, note="TPU slices the data axis spans"),
    "mesh.replicated_limit": number(0, integer=True),
    "mesh.gather_weights": one_of(*GATHER_WEIGHTS),
    "mesh.rules": Rule(_is_rules, f"a tuple of (logical name, mesh axes) pairs, the axes None, "
                                  f"one of {list(MESH_AXES)} or a tuple of them"),
}


def check(config) -> None:
  """At most one mesh axis is -1, none is 0 (the device count is checked by `make_mesh`)."""
  sizes = {axis: config.mesh[axis] for axis in MESH_AXES}
  if list(sizes.values()).count(-1) > 1 or 0 in sizes.values():
    raise ValueError(f"mesh.data/fsdp/tensor={sizes}: each must be a positive size, at most one -1")


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


def physical_shape(devices) -> tuple:
  """The grid of chips the devices sit on ('4x4x4' of a v5p-128 as (4, 4, 4)); () for devices
  without coordinates (CPU, GPU)."""
  coords = [getattr(device, "coords", None) for device in devices]
  if any(c is None for c in coords):
    return ()
  return tuple(max(c[i] for c in coords) - min(c[i] for c in coords) + 1
               for i in range(len(coords[0])))


def _fitting_shapes(num_devices: int, devices) -> list:
  """'data=a fsdp=b' of the two-axis meshes (tensor = 1) that jax.make_mesh lays out on these
  devices without splitting a physical axis."""
  found = []
  for data in range(1, num_devices + 1):
    if num_devices % data:
      continue
    try:
      jax.make_mesh((data, num_devices // data, 1), MESH_AXES, devices=devices)
    except Exception:  # noqa: BLE001 -- this shape does not follow the torus
      continue
    found.append(f"data={data} fsdp={num_devices // data}")
  return found


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """The mesh of config.mesh on `devices` (default: all), in the hardware's own order.

  jax.make_mesh lays each mesh axis along whole axes of the chips' torus. A shape that does not
  follow the torus (data=2 x fsdp=32 on a v5p-128's 4x4x4 chips) is laid out by letting JAX
  split a physical axis (mesh_utils' allow_split_physical_axes; valid, with some collectives
  over more hops), said in one console line; a shape that cannot be laid out even so stops the
  run before anything compiles, naming the mesh fields, the chips' shape and the shapes that fit.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  slices = mesh_config.dcn_data
  from jax.experimental import mesh_utils
  if slices == 1:
    try:
      return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except (NotImplementedError, ValueError, AssertionError) as error:
      physical = "x".join(map(str, physical_shape(devices))) or "?"
      requested = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
      try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      except Exception:  # noqa: BLE001 -- reported with the first error below
        raise ValueError(
            f"mesh.data/fsdp/tensor: {requested} cannot be laid out on the {len(devices)} "
            f"devices' {physical} torus ({type(error).__name__}); shapes that fit: "
            f"{', '.join(_fitting_shapes(len(devices), devices)) or 'none found'}") from error
      from kdiff_jax import console
      console.info("mesh %s does not follow the %s torus's axes: JAX splits a physical axis "
                   "(valid; some collectives take more hops; %s follow it)", requested,
                   physical, ", ".join(_fitting_shapes(len(devices), devices)[:4]))
      return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)
  if sizes["data"] % slices:
    raise ValueError(f"mesh.data={sizes['data']} must be a multiple of mesh.dcn_data={slices}")
  per_slice = (sizes["data"] // slices, sizes["fsdp"], sizes["tensor"])
  grid = mesh_utils.create_hybrid_device_mesh(per_slice, (slices, 1, 1), devices)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


def rules_dict(rules) -> dict:
  return {name: axes for name, axes in rules}


def logical_to_spec(logical: P, shape, mesh: jax.sharding.Mesh, rules: dict) -> P:
  """Map a PartitionSpec of logical names to mesh axes.

  A dim takes the mesh axes its name's rule gives when its size divides by them. A mesh axis
  that no dim could take that way then goes to the largest dim still unsharded that divides by
  it (an FSDP axis shards a weight along any dim); dims nothing divides stay replicated.
  """
  spec, used, unplaced = [], set(), []
  for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
    axes = _axes_tuple(rules.get(name)) if name is not None else ()
    axes = tuple(axis for axis in axes if axis not in used and mesh.shape[axis] > 1)
    if axes and dim % math.prod(mesh.shape[axis] for axis in axes) == 0:
      spec.append(axes[0] if len(axes) == 1 else axes)
      used.update(axes)
    else:
      spec.append(None)
      unplaced.extend(axis for axis in axes if axis not in unplaced)
  for axis in unplaced:
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % mesh.shape[axis] == 0]
    if axis not in used and mesh.shape[axis] > 1 and free:
      spec[max(free, key=lambda i: shape[i])] = axis
      used.add(axis)
  return P(*spec)


def tree_shardings(abstract_tree, logical_tree, mesh, rules):
  """NamedShardings for a pytree of arrays given a matching pytree of logical PartitionSpecs."""
  rules = rules_dict(rules)
  return jax.tree.map(
      lambda array, logical: NamedSharding(mesh, logical_to_spec(logical, array.shape, mesh, rules)),
      abstract_tree, logical_tree, is_leaf=lambda x: isinstance(x, P))


def replicated_arrays(abstract_tree, shardings) -> list:
  """(path, shape, elements) of every array that no mesh axis shards, largest first."""
  found = []
  for (path, array), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract_tree),
                                     jax.tree.leaves(shardings)):
    if all(axes is None for axes in sharding.spec):
      found.append((jax.tree_util.keystr(path), tuple(array.shape), math.prod(array.shape)))
  return sorted(found, key=lambda entry: -entry[2])


def check_replicated(abstract_tree, shardings, mesh, limit: int) -> None:
  """On a mesh with fsdp > 1, no array of more than `limit` elements may stay replicated."""
  if mesh.shape["fsdp"] <= 1:
    return
  large = [entry for entry in replicated_arrays(abstract_tree, shardings) if entry[2] > limit]
  if large:
    listed = ", ".join(f"{path} {list(shape)}" for path, shape, _ in large[:5])
    raise ValueError(
        f"{len(large)} parameters of more than mesh.replicated_limit={limit} elements would be "
        f"replicated on every device of the fsdp={mesh.shape['fsdp']} mesh: no dim divides by "
        f"it ({listed}). Split the mesh (e.g. mesh.data=2 with mesh.fsdp half as large), or "
        "raise mesh.replicated_limit to accept the copies")


def without_axes(sharding: NamedSharding, axes) -> NamedSharding:
  """`sharding` with the mesh axes `axes` taken out of its spec (those dims gathered)."""
  def keep(entry):
    kept = tuple(axis for axis in _axes_tuple(entry) if axis not in axes)
    return None if not kept else (kept[0] if len(kept) == 1 else kept)
  return NamedSharding(sharding.mesh, P(*(keep(entry) for entry in sharding.spec)))


def gathered_once(tree, shardings, axes):
  """`tree` (sharded as `shardings`) all-gathered over the mesh axes `axes`, once: the forward
  is one all-gather per array whose copy every later use reads, the backward one reduce-scatter
  of the summed cotangent back to `shardings`.

  FSDP's weight traffic at the least (mesh.gather_weights = 'once'): a loss that calls the
  network k times (MeanFlow's two gradient-carrying calls, TVM's, IMM's target pass) then
  gathers each weight once per step instead of once per call for the forward and again for the
  backward (and again under remat), and its gradients from every call are summed before one
  reduce-scatter. The price is the gathered weights held in HBM through the step (the
  compute-dtype copy of the weights, whole, per chip). The values are the same either way.
  """
  full = jax.tree.map(lambda sharding: without_axes(sharding, axes), shardings)

  @jax.custom_vjp
  def gather(tree):
    return jax.lax.with_sharding_constraint(tree, full)

  def forward(tree):
    return gather(tree), None

  def backward(_, cotangent):
    return (jax.lax.with_sharding_constraint(cotangent, shardings),)

  gather.defvjp(forward, backward)
  return gather(tree)


def batch_axes(rules) -> tuple:
  """The mesh axes the leading (batch) dim is split over: the rule 'batch' (default data, fsdp)."""
  return _axes_tuple(rules_dict(rules).get("batch", DEFAULT_BATCH_AXES))


_BATCH_AXES = contextvars.ContextVar("batch_axes", default=None)


@contextlib.contextmanager
def activations_on(mesh, rules):
  """Inside (while tracing): `constrain_batch` shards activations over the batch axes of mesh."""
  token = _BATCH_AXES.set(batch_axes(rules))
  try:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      yield
  finally:
    _BATCH_AXES.reset(token)


def constrain_batch(x):
  """x with its leading (batch) dim split over the batch axes, inside `activations_on` and when
  it divides; else x. A lax.scan's carry needs it: without it XLA shards the scanned blocks'
  weights and all-gathers whole activations across the batch axes instead (seen in the TPU
  compile of DiT with model.scan_blocks)."""
  axes = _BATCH_AXES.get()
  if axes is None:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if x.shape[0] % math.prod(mesh.shape[axis] for axis in axes):
    return x
  return jax.lax.with_sharding_constraint(x, P(axes))


def batch_sharding(mesh, rules) -> NamedSharding:
  """Sharding of the leading (batch) dim of every input array."""
  return NamedSharding(mesh, P(batch_axes(rules)))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(batch_size: int, sharding: NamedSharding, *, field: str, group_size: int = 1,
                process_count: int | None = None) -> None:
  """The global batch `field` splits evenly over the batch shards of `sharding`
  (batch_sharding(mesh, rules)) and the processes, and each shard holds whole groups of
  `group_size` consecutive examples (IMM's particle groups)."""
  process_count = jax.process_count() if process_count is None else process_count
  axes = _axes_tuple(sharding.spec[0] if len(sharding.spec) else None)
  shards = math.prod(sharding.mesh.shape[axis] for axis in axes)
  if batch_size % shards:
    raise ValueError(f"{field}={batch_size} must be divisible by the {shards} batch shards "
                     f"(mesh axes {axes} = {[sharding.mesh.shape[axis] for axis in axes]})")
  if batch_size % process_count:
    raise ValueError(f"{field}={batch_size} must be divisible by the {process_count} processes")
  per_shard = batch_size // shards
  if per_shard % group_size:
    raise ValueError(f"{field}={batch_size} gives {per_shard} examples per device, not a "
                     f"multiple of the objective's group size {group_size}: groups must stay "
                     "whole on one device")


def describe(mesh) -> str:
  return " x ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
