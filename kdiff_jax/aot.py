"""Ahead-of-time compiles of the train step and the sampler, for any devices, measured.

  setup, compiled = aot.compile_train_step(config, hardware.tpu_slice("v5p:4x4x4").devices)
  compiled.total, compiled.flops, compiled.collectives["all-gather"]   # per chip

Nothing runs: the programs are lowered with the run's abstract state and batch (train_state.setup's
shardings) and compiled by the devices' own compiler, libtpu's XLA for a deviceless TPU slice.
memory_analysis() gives each device's bytes of arguments, outputs and temporaries;
cost_analysis() XLA's FLOPs and its `optimal_seconds`; the compiled HLO text the collectives.
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

from kdiff_jax import data, parallel, sampling, train_state

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\((.*?)\)")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
# libtpu: "... the total memory required for HLO temporaries (43.92G) exceeds available HBM (30.75G)"
_NEEDED = re.compile(r"required for (.*?) \(([0-9.]+[KMGT])\) exceeds available HBM \(([0-9.]+[KMGT])\)")


def _arrays(text):
  """[(dtype, shape)] of the arrays an HLO shape string names."""
  return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in
          _ARRAY.findall(text)]


def _nbytes(arrays) -> int:
  return sum(_BYTES[dtype] * math.prod(shape) for dtype, shape in arrays)


def collectives(hlo_text: str) -> dict:
  """kind -> (static count, result bytes, result shapes) of the collectives in compiled HLO text.

  An async op is counted at its -start; its tuple result holds the operands first, then the
  results, and only the results count.
  """
  found = {}
  for result, kind, start, operands in _COLLECTIVE.findall(hlo_text):
    results = _arrays(result)
    if start and result.startswith("("):
      results = results[len(_arrays(operands)):] or results
    count, nbytes, shapes = found.get(kind, (0, 0, []))
    found[kind] = (count + 1, nbytes + _nbytes(results), shapes + [s for _, s in results])
  return found


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
  collectives: dict = dataclasses.field(default_factory=dict)
  input_shardings: tuple = ()
  output_shardings: object = None
  error: str = ""


def compile_program(jitted, *abstract_args) -> Compiled:
  """jitted.lower(*abstract_args).compile() for the devices of the shardings, measured (never
  from or into a persistent compilation cache: the compile time is a result)."""
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
  return Compiled(
      True, seconds, args=memory.argument_size_in_bytes, outputs=outputs,
      temps=memory.temp_size_in_bytes,
      total=memory.argument_size_in_bytes + outputs + memory.temp_size_in_bytes,
      flops=float(cost.get("flops", 0.0)),
      optimal_seconds=float(cost.get("optimal_seconds", float("nan"))),
      collectives=collectives(compiled.as_text()),
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
                                abstract_batch)


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
  return compile_program(jitted, params, noise, labels, key)


def batch_unit(setup: train_state.Setup) -> int:
  """The step of global batch sizes that split evenly: batch shards x the objective's group size."""
  axes = parallel.batch_axes(setup.config.mesh.rules)
  return math.prod(setup.mesh.shape[a] for a in axes) * setup.objective.group_size
