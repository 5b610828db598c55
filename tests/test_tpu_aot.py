"""The sharding rules hold on a real TPU executable: a tiny DiT's train step compiled by libtpu
for a 4-chip v5e slice over 2 hosts, with no TPU attached (requirements-tpu.txt).

What FSDP promises, read from the compiled program: every parameter and optimizer moment is
sharded over 'fsdp' in the executable's input shardings, a chip's argument bytes are the state's
total over fsdp (within 10%), and no all-gather brings a whole batch of activations to a chip.
"""
import importlib.util
import math

import jax
import pytest
from jax.sharding import PartitionSpec as P

from configs import default
from kdiff_jax import aot, collectives, hardware, train

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                       reason="libtpu is not installed: pip install -r requirements-tpu.txt "
                              "(the TPU compiler; no TPU needed)"),
    pytest.mark.xdist_group("libtpu"),  # one process at a time may hold libtpu's lock file
]

BATCH = 40   # divides over the 4 chips, and equals no parameter's dimension
TOKENS = 16  # (8 / patch 2)^2


def _tiny_config(rules=None, scan=False):
  config = default.get_config()
  config.data.name, config.data.image_size, config.data.channels = "synthetic", 8, 4
  config.data.num_classes = 10
  config.model.size, config.model.patch_size = "XS", 2   # widths of 128: little TPU tile padding
  config.model.scan_blocks = scan
  config.training.batch_size = BATCH
  config.eval.batch_size = 8
  config.mesh.data, config.mesh.fsdp = 1, -1
  if rules is not None:
    config.mesh.rules = rules
  return config


@pytest.fixture(scope="module")
def devices():
  devices = hardware.tpu_slice("v5e:2x2", host_bounds=(1, 2, 1)).devices
  assert len(devices) == 4 and len({d.process_index for d in devices}) == 2
  return devices


def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def assert_fsdp_holds(setup, compiled: aot.Compiled):
  """What the default rules promise for fsdp = 4, checked on the compiled train step: every
  parameter with an 'embed' dim (('embed', 'fsdp')), its Adam moments and EMA are sharded over
  fsdp, and a chip holds a quarter of the state."""
  state_shardings = jax.tree_util.tree_leaves_with_path(compiled.input_shardings[0][0])
  logical = jax.tree_util.tree_leaves_with_path(
      setup.model.logical_net, is_leaf=lambda x: isinstance(x, P))
  promised = {jax.tree_util.keystr(path): "embed" in spec for path, spec in logical}
  checked = 0
  for path, sharding in state_shardings:
    path = jax.tree_util.keystr(path)
    if path.startswith("['step']") or path.startswith("['rng']"):
      continue
    net_path = path[path.index("['net']") + len("['net']"):] if "['net']" in path else None
    if net_path in promised and promised[net_path]:
      assert "fsdp" in jax.tree.leaves(tuple(sharding.spec)), (path, sharding.spec)
      checked += 1
  assert checked >= 3 * len([p for p in promised.values() if p])  # params, mu, nu, EMA
  total = _nbytes(setup.abstract_state) + BATCH * (8 * 8 * 4 * 4 + 4)
  assert compiled.args == pytest.approx(total / 4, rel=0.1), (compiled.args, total)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_tiny_dit_compiles_for_two_hosts_and_shards_as_promised(devices, scan):
  setup, compiled = aot.compile_train_step(_tiny_config(scan=scan), devices)
  assert compiled.ok, compiled.error
  assert setup.mesh.shape["fsdp"] == 4
  assert_fsdp_holds(setup, compiled)
  gathered = compiled.collectives["all-gather"].shapes
  assert gathered, "FSDP all-gathers the parameters"
  # No [B, tokens, ...] activation (nor B*tokens rows) is gathered; XLA may gather the [B, D]
  # conditioning vector for its weight gradients, which is 1/tokens of one.
  activations = [shape for shape in gathered if (BATCH in shape and TOKENS in shape)
                 or BATCH * TOKENS in shape]
  assert not activations, activations
  assert compiled.flops > 0 and compiled.temps > 0


def test_the_check_fails_when_embed_maps_to_nothing(devices):
  """With ('embed', None) the weights are replicated: the promise above must not hold."""
  rules = tuple(rule for rule in default.get_config().mesh.rules if rule[0] != "embed")
  setup, compiled = aot.compile_train_step(_tiny_config(rules + (("embed", None),)), devices)
  assert compiled.ok, compiled.error
  with pytest.raises(AssertionError):
    assert_fsdp_holds(setup, compiled)


def test_sampler_compiles_batch_sharded(devices):
  setup = train.setup(_tiny_config(), devices)
  compiled = aot.compile_sampler(setup)
  assert compiled.ok, compiled.error
  assert compiled.output_shardings.spec[0] == ("data", "fsdp")


def test_meanflow_all_reduces_each_weight_gradient_once(devices):
  """MeanFlow's cheaper step runs the network twice with gradient (the r = t rows' forward and
  the JVP's primal). In bfloat16 the train step casts the weights once (state.compute_weights), so
  the two gradients of a weight are summed before their one all-reduce: about half the float32
  bytes of the weights (the Linear kernels in bf16). Cast inside each call, the compiler
  all-reduces each call's bf16 gradient, as many bytes as all weights in float32."""
  config = _tiny_config()
  config.model.size = "T"   # the smallest DiT: only the all-reduced bytes are read here
  config.mesh.data, config.mesh.fsdp = -1, 1
  config.model.compute_dtype = "bfloat16"
  config.model.second_time_embedder = True
  config.model.time_scale = 1.0
  config.objective.name = "meanflow"
  config.objective.schedule = "rectified_flow"
  config.objective.meanflow.share_r_equals_t = 0.5   # groups of 2: 10 rows per chip
  config.objective.meanflow.omega, config.objective.meanflow.kappa = 0.5, 0.3
  config.sampling.method = "mean_flow"
  setup, compiled = aot.compile_train_step(config, devices)
  assert compiled.ok, compiled.error
  assert setup.mesh.shape["data"] == 4
  float32_bytes = _nbytes(setup.model.abstract_net)
  reduced = compiled.collectives["all-reduce"].result_bytes
  assert 0.4 * float32_bytes < reduced < 0.75 * float32_bytes, (reduced, float32_bytes)


def _meanflow_config(gather_weights):
  config = _tiny_config()
  config.model.size = "T"
  config.model.compute_dtype = "bfloat16"
  config.model.second_time_embedder = True
  config.model.time_scale = 1.0
  config.objective.name = "meanflow"
  config.objective.schedule = "rectified_flow"
  config.objective.meanflow.share_r_equals_t = 0.5
  config.objective.meanflow.omega, config.objective.meanflow.kappa = 0.5, 0.3
  config.sampling.method = "mean_flow"
  config.mesh.gather_weights = gather_weights
  return config


@pytest.fixture(scope="module")
def fsdp_meanflow(devices):
  """MeanFlow's step on fsdp 4, its weights gathered once and per call: (setup, compiled) each."""
  return {gather: aot.compile_train_step(_meanflow_config(gather), devices)
          for gather in ("once", "per_call")}


def test_an_fsdp_step_reduce_scatters_its_gradients(fsdp_meanflow):
  """libtpu reduces an FSDP gradient in a fusion that all-reduces the full shape and slices the
  chip's shard out: read as the chip runs it, each weight's gradient is reduce-scattered from
  its full shape to a quarter of it, and no full-shape gradient is all-reduced."""
  setup, compiled = fsdp_meanflow["once"]
  assert compiled.ok, compiled.error
  sharded = {tuple(x.shape) for x, sharding in zip(
      jax.tree.leaves(setup.model.abstract_net), jax.tree.leaves(setup.weights.shardings["net"]))
      if "fsdp" in jax.tree.leaves(tuple(sharding.spec)) and math.prod(x.shape) >= 4096}
  found = collectives.read(compiled.hlo, setup.mesh)
  scattered = [(full, result) for c in found if c.kind == "reduce-scatter"
               for (_, full), (_, result) in zip(c.full_shapes, c.result_shapes)]
  assert {full for full, _ in scattered} >= sharded, sharded - {full for full, _ in scattered}
  assert all(math.prod(full) == 4 * math.prod(result) for full, result in scattered), scattered
  all_reduced = {shape for c in found if c.kind == "all-reduce" for _, shape in c.full_shapes}
  assert not all_reduced & sharded, all_reduced & sharded
  ideal = aot.ideal_collectives(setup)
  assert compiled.collectives["reduce-scatter"].sent_bytes == pytest.approx(
      ideal["reduce-scatter"], rel=0.25)


def test_meanflow_gathers_each_weight_once_per_step(fsdp_meanflow):
  """MeanFlow's loss calls the network with gradient twice (and its JVP): gathered per call,
  each weight crosses the ICI for every call's forward and backward; with
  mesh.gather_weights = 'once' for one forward in all (half the ideal's forward + backward)."""
  once_setup, once = fsdp_meanflow["once"]
  _, per_call = fsdp_meanflow["per_call"]
  assert once.ok and per_call.ok, (once.error, per_call.error)
  one_gather = aot.ideal_collectives(once_setup)["all-gather"] / 2
  assert once.collectives["all-gather"].sent_bytes < 1.25 * one_gather
  assert per_call.collectives["all-gather"].sent_bytes > 1.5 * one_gather
