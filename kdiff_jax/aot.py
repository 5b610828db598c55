"""Ahead-of-time compiles of the train step and the sampler, for any devices, measured.

  setup, compiled = aot.compile_train_step(config, hardware.tpu_slice("v5p:4x4x4").devices)
  compiled.total, compiled.flops, compiled.collectives["all-gather"]   # per chip

Nothing runs: the programs are lowered with the run's abstract state and batch (train_state.setup's
shardings) and compiled by the devices' own compiler, libtpu's XLA for a deviceless TPU slice.
memory_analysis() gives each device's bytes of arguments, outputs and temporaries;
cost_analysis() XLA's FLOPs and its `optimal_seconds`; the compiled HLO text the collectives,
read as the chip runs them (kdiff_jax/collectives.py), and `ideal_collectives` what the step
must send at the least.
A program that does not fit the device's memory fails to compile: `Compiled.ok` is False and
`error` carries the compiler's figure.
"""
import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
from jax._src import config as jax_config  # enable_compilation_cache as a context

from kdiff_jax import collectives, data, parallel, sampling, train_state

# libtpu: "... the total memory required for HLO temporaries (43.92G) exceeds available HBM (30.75G)"
_NEEDED = re.compile(r"required for (.*?) \(([0-9.]+[KMGT])\) exceeds available HBM \(([0-9.]+[KMGT])\)")


@dataclasses.dataclass
class Compiled:
  """What the TPU compiler said about one program on one slice."""
  ok: bool
  seconds: float
  args: float = 0.0
  outputs: float = 0.0
  temps: float = 0.0
  total: float = 0.0
  flops: float = 0.0
  optimal_seconds: float = float("nan")
  collectives: dict = dataclasses.field(default_factory=dict)   # kind -> collectives.Summary
  hlo: str = ""   # the compiled program's HLO text, to read what the figures came from
  input_shardings: tuple = ()
  output_shardings: object = None
  error: str = ""


def compile_program(jitted, *abstract_args, mesh=None) -> Compiled:
  """jitted.lower(*abstract_args).compile() for the devices of the shardings, measured (never
  from or into a persistent compilation cache: the compile time is a result); `mesh` names the
  axes each collective spans."""
  start = time.perf_counter()
  try:
    with jax_config.enable_compilation_cache(False):
      compiled = jitted.lower(*abstract_args).compile()
  except Exception as error:  # noqa: BLE001 - XLA reports running out of HBM as an exception
    message = str(error)
    needed = _NEEDED.search(message)
    short = (f"out of HBM: {needed.group(1)} need {needed.group(2)}, {needed.group(3)} available"
             if needed else message.split("\n")[0])
    return Compiled(False, time.perf_counter() - start, error=short[:300])
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes
  hlo = compiled.as_text()
  return Compiled(
      True, seconds, args=memory.argument_size_in_bytes, outputs=outputs,
      temps=memory.temp_size_in_bytes,
      total=memory.argument_size_in_bytes + outputs + memory.temp_size_in_bytes,
      flops=float(cost.get("flops", 0.0)),
      optimal_seconds=float(cost.get("optimal_seconds", float("nan"))),
      collectives=collectives.summarize(collectives.read(hlo, mesh)), hlo=hlo,
      input_shardings=compiled.input_shardings, output_shardings=compiled.output_shardings)


def compile_train_step(config, devices):
  """(Setup, Compiled) of the jitted train step (train_state.make_train_step) for config on
  devices."""
  setup = train_state.setup(config, devices)
  batch = config.training.batch_size
  sharding = parallel.batch_sharding(setup.mesh, config.mesh.rules)
  abstract_batch = {
      "image": jax.ShapeDtypeStruct((batch,) + data.element_shape(config.data), jnp.float32,
                                    sharding=sharding),
      "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)}
  return setup, compile_program(train_state.make_train_step(setup), setup.abstract_state,
                                abstract_batch, mesh=setup.mesh)


def ideal_collectives(setup: train_state.Setup) -> dict:
  """kind -> the bytes per chip a train step of `setup` must send at the least
  (collectives.ideal): the gradients in the dtype the step reduces them in (the compute dtype
  of the weights it casts once), the weights gathered for the forward and the backward, and once
  more with remat."""
  abstract = setup.weights.abstract
  net_dtypes = jax.eval_shape(setup.model.compute_weights, abstract["net"])
  dtypes = jax.tree.map(lambda x: x.dtype, dict(abstract, net=net_dtypes))
  gathers = 2 + (setup.config.model.remat != "none")
  return collectives.ideal(abstract, setup.weights.shardings, dtypes, setup.mesh,
                           gathers=gathers, batch_axes=parallel.batch_axes(setup.config.mesh.rules))


def compile_sampler(setup: train_state.Setup) -> Compiled:
  """The sampler of the run's grids and FID: eval.batch_size images split over the batch axes."""
  config = setup.config
  sample = sampling.build(config, setup.objective.description, setup.model.apply)
  sharding = parallel.batch_sharding(setup.mesh, config.mesh.rules)
  replicated = parallel.replicated(setup.mesh)
  batch = config.eval.batch_size
  noise = jax.ShapeDtypeStruct((batch,) + data.element_shape(config.data), jnp.float32,
                               sharding=sharding)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  params = setup.abstract_state["params"]
  jitted = jax.jit(sample, out_shardings=sharding)
  return compile_program(jitted, params, noise, labels, key, mesh=setup.mesh)


def batch_unit(setup: train_state.Setup) -> int:
  """The step of global batch sizes that split evenly: batch shards x the objective's group size."""
  axes = parallel.batch_axes(setup.config.mesh.rules)
  return math.prod(setup.mesh.shape[a] for a in axes) * setup.objective.group_size
