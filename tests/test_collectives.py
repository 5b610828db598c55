"""The collective report (kdiff_jax/collectives.py) on HLO text written by hand, whose bytes are
counted here independently, and the gather-once weights (parallel.gathered_once) on 8 devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kdiff_jax import collectives, parallel

# libtpu's spellings (copied in shape from a v5p compile of an FSDP step, names shortened): a
# reduce-scatter fusion, an all-gather with named mesh groups, a scanned block's all-gather
# inside a while loop of 28 trips, an async all-reduce with iota groups, a plain reduce-scatter.
HLO = """\
HloModule jit_train_step, entry_computation_layout={()->()}

%add (x: bf16[], y: bf16[]) -> bf16[] {
  %x = bf16[] parameter(0)
  %y = bf16[] parameter(1)
  ROOT %add.1 = bf16[] add(%x, %y)
}

%all-reduce-scatter.3 (input.3: bf16[128,768]) -> bf16[32,768] {
  %input.3 = bf16[128,768]{1,0:T(8,128)(2,1)} parameter(0)
  %all-reduce.159 = bf16[128,768]{1,0:T(8,128)(2,1)} all-reduce(%input.3), channel_id=62, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add
  %partition-id.39 = u32[] partition-id()
  %constant.1679 = u32[] constant(32)
  %multiply.416 = u32[]{:T(128)} multiply(%partition-id.39, %constant.1679)
  %constant.1680 = u32[] constant(0)
  ROOT %dynamic-slice.164 = bf16[32,768]{1,0:T(8,128)(2,1)} dynamic-slice(%all-reduce.159, %multiply.416, %constant.1680), dynamic_slice_sizes={32,768}
}

%body.7 (param: (s32[], bf16[16,64])) -> (s32[], bf16[16,64]) {
  %param = (s32[], bf16[16,64]) parameter(0)
  %gte.1 = bf16[16,64]{1,0} get-tuple-element(%param), index=1
  %all-gather.9 = bf16[64,64]{1,0} all-gather(%gte.1), channel_id=3, replica_groups=mesh['axis_0'=1,'axis_1'=4] {'axis_1'}, dimensions={0}, use_global_device_ids=true
  %gte.0 = s32[] get-tuple-element(%param), index=0
  ROOT %tuple.2 = (s32[], bf16[16,64]) tuple(%gte.0, %gte.1)
}

%cond.7 (param.1: (s32[], bf16[16,64])) -> pred[] {
  %param.1 = (s32[], bf16[16,64]) parameter(0)
  %gte.2 = s32[] get-tuple-element(%param.1), index=0
  %constant.28 = s32[] constant(28)
  ROOT %compare.1 = pred[] compare(%gte.2, %constant.28), direction=LT
}

ENTRY %main.216_spmd (p0: bf16[32,256], p1: bf16[128,768], p2: f32[8,64]) -> f32[2,64] {
  %p0 = bf16[32,256]{1,0:T(8,128)(2,1)} parameter(0)
  %p1 = bf16[128,768]{1,0:T(8,128)(2,1)} parameter(1)
  %p2 = f32[8,64]{1,0} parameter(2)
  %all-gather.1 = bf16[128,256]{1,0:T(8,128)(2,1)} all-gather(%p0), channel_id=2, replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, dimensions={0}, use_global_device_ids=true
  %fusion.21 = bf16[32,768]{1,0:T(8,128)(2,1)} fusion(%p1), kind=kCustom, calls=%all-reduce-scatter.3
  %init = (s32[], bf16[16,64]) tuple(%c0, %x0)
  %while.1 = (s32[], bf16[16,64]) while(%init), condition=%cond.7, body=%body.7, backend_config={"known_trip_count":{"n":"28"}}
  %all-reduce-start.2 = f32[8,64]{1,0} all-reduce-start(%p2), channel_id=5, replica_groups=[2,2]<=[4], use_global_device_ids=true, to_apply=%add
  %all-reduce-done.2 = f32[8,64]{1,0} all-reduce-done(%all-reduce-start.2)
  ROOT %reduce-scatter.4 = f32[2,64]{1,0} reduce-scatter(%all-reduce-done.2), channel_id=6, replica_groups=[1,4]<=[2,2]T(1,0), dimensions={0}, to_apply=%add
}
"""


class _Mesh:
  """What `read` needs of a mesh: its device grid's shape and axis names."""
  def __init__(self, shape, names):
    self.devices = np.empty(shape, object)
    self.axis_names = names


def _mesh(shape):
  return jax.make_mesh(shape, parallel.MESH_AXES, devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _by_name():
  return {c.name: c for c in collectives.read(HLO, _Mesh((2, 2, 1), ("data", "fsdp", "tensor")))}


def test_the_reduce_scatter_fusion_is_a_reduce_scatter_of_the_full_gradient():
  found = _by_name()
  scatter = found["all-reduce.159"]
  assert scatter.kind == "reduce-scatter"
  assert scatter.full_shapes == (("bf16", (128, 768)),)
  assert scatter.result_shapes == (("bf16", (32, 768)),)
  assert scatter.group_size == 4 and scatter.axes == ("data", "fsdp")
  assert scatter.sent_bytes == pytest.approx(3 / 4 * 128 * 768 * 2)   # (n-1)/n of the full array
  assert not [c for c in found.values() if c.kind == "all-reduce" and
              c.full_shapes == (("bf16", (128, 768)),)]


def test_groups_in_every_spelling_and_the_axes_they_span():
  found = _by_name()
  # mesh['axis_0'=4,'axis_1'=1] {'axis_0'}: devices 0..3, all of the 2x2 mesh's batch axes
  assert (found["all-gather.1"].group_size, found["all-gather.1"].axes) == (4, ("data", "fsdp"))
  # [2,2]<=[4]: groups {0,1} and {2,3}, which differ along the last axis of size 2 ('fsdp')
  assert (found["all-reduce-start.2"].group_size, found["all-reduce-start.2"].axes) == (2, ("fsdp",))
  # [1,4]<=[2,2]T(1,0): one group {0,2,1,3}: both axes
  assert found["reduce-scatter.4"].group_size == 4
  assert found["reduce-scatter.4"].axes == ("data", "fsdp")


def test_named_groups_over_a_device_order():
  """libtpu's `mesh[...], device_ids=([4,16]T(1,0)) {axis}`: the devices of the named mesh in
  the order of that transposed iota, here a data 4 x fsdp 16 mesh's two axes."""
  mesh = _Mesh((4, 16, 1), ("data", "fsdp", "tensor"))
  line = ("  %all-gather.1 = bf16[64,1024]{1,0} all-gather(%p), channel_id=1, "
          "replica_groups=mesh['axis_0'=1,'axis_1'=16,'axis_2'=4], device_ids=([4,16]T(1,0)) "
          "{'AXIS'}, dimensions={0}")
  for spanned, size, axes in (("axis_1", 16, ("fsdp",)), ("axis_2", 4, ("data",))):
    hlo = HLO.replace(HLO[HLO.index("  %all-gather.1 ="):HLO.index("\n", HLO.index("  %all-gather.1 ="))],
                      line.replace("AXIS", spanned))
    gather = {c.name: c for c in collectives.read(hlo, mesh)}["all-gather.1"]
    assert (gather.group_size, gather.axes) == (size, axes)


CHAIN = """\
%async_collective_fusion.1 (param_0.1: bf16[16,64]) -> bf16[64,64] {
  %param_0.1 = bf16[16,64]{1,0} parameter(0)
  ROOT %all-gather.5 = bf16[64,64]{1,0} all-gather(%param_0.1), channel_id=21, replica_groups={{0,1,2,3}}, dimensions={0}, frontend_attributes={chain_id="5"}
}

%fused_computation.2 (param_0.2: bf16[16,64]) -> bf16[64,64] {
  %param_0.2 = bf16[16,64]{1,0} parameter(0)
  ROOT %all-gather.6 = bf16[64,64]{1,0:S(1)} all-gather(%param_0.2), channel_id=21, replica_groups={{0,1,2,3}}, dimensions={0}, frontend_attributes={chain_id="5"}
}

ENTRY %main (p0: bf16[16,64], p1: bf16[128,768], p2: bf16[128,768]) -> bf16[64,64] {
  %p0 = bf16[16,64]{1,0} parameter(0)
  %p1 = bf16[128,768]{1,0} parameter(1)
  %p2 = bf16[128,768]{1,0} parameter(2)
  %fusion.1 = bf16[64,64]{1,0} fusion(%p0), kind=kCustom, calls=%async_collective_fusion.1
  %fusion.3 = bf16[32,768]{1,0} fusion(%p1), kind=kCustom, calls=%all-reduce-scatter.3
  %fusion.4 = bf16[32,768]{1,0} fusion(%p2), kind=kCustom, calls=%all-reduce-scatter.4
  ROOT %fusion.2 = bf16[64,64]{1,0} fusion(%fusion.1), kind=kCustom, calls=%fused_computation.2
}
"""


def test_an_async_chain_is_one_collective_and_a_shared_channel_id_is_not():
  """The copies of one all-gather in the fusions of its chain (same chain_id) are one; two
  reduce-scatter fusions of the same shapes that libtpu gave the same channel_id are two."""
  scatter = HLO[HLO.index("%all-reduce-scatter.3"):HLO.index("%body.7")]
  hlo = scatter + scatter.replace("scatter.3", "scatter.4").replace("input.3", "input.4") + CHAIN
  summary = collectives.summarize(collectives.read(hlo))
  assert summary["all-gather"].count == 1
  assert summary["all-gather"].sent_bytes == pytest.approx(3 / 4 * 64 * 64 * 2)
  assert summary["reduce-scatter"].count == 2


def test_an_async_start_counts_its_results_once():
  """An HLO fragment in the older spelling (operand shapes inline): the -start is counted with
  its results only (its tuple holds the operand first), the -done not at all."""
  fragment = """
  %ag = (bf16[1,32,24]{1,2,0}, bf16[4,32,24]{1,2,0}) all-gather-start(bf16[1,32,24]{1,2,0} %p), dimensions={0}, replica_groups={{0,1,2,3}}
  %ag.d = bf16[4,32,24]{1,2,0} all-gather-done(%ag)
  %ar = (f32[64,192]{1,0}, f32[128]{0}) all-reduce(f32[64,192]{1,0} %a, f32[128]{0} %b), to_apply=%sum
  %ar.2 = f32[8]{0} all-reduce(f32[8]{0} %c), to_apply=%sum
"""
  summary = collectives.summarize(collectives.read(fragment, _Mesh((1, 4, 1), ("data", "fsdp", "tensor"))))
  assert set(summary) == {"all-gather", "all-reduce"}
  assert summary["all-gather"].count == 1 and summary["all-gather"].shapes == ((4, 32, 24),)
  assert summary["all-gather"].result_bytes == 4 * 32 * 24 * 2
  assert summary["all-reduce"].count == 2
  assert summary["all-reduce"].result_bytes == (64 * 192 + 128 + 8) * 4
  assert summary["all-reduce"].shapes == ((64, 192), (128,), (8,))
  # no replica_groups: one group of the mesh's 4 devices
  assert summary["all-reduce"].sent_bytes == pytest.approx(2 * 3 / 4 * (64 * 192 + 128 + 8) * 4)


def test_a_gather_done_by_all_reduce_is_a_gather_at_the_all_reduces_bytes():
  """libtpu's gather over a 64-chip group of a v5p-128: each chip writes its shard into zeros
  (a dynamic-update-slice, here fused) and the full array is all-reduced."""
  fragment = """
%pad (param_0: bf16[2,64]) -> bf16[128,64] {
  %param_0 = bf16[2,64]{1,0} parameter(0)
  %zero = bf16[128,64]{1,0} broadcast(%c), dimensions={}
  ROOT %dynamic-update-slice.1 = bf16[128,64]{1,0} dynamic-update-slice(%zero, %param_0, %i, %j)
}

ENTRY %main (p0: bf16[2,64], p1: f32[8]) -> bf16[128,64] {
  %p0 = bf16[2,64]{1,0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  %fusion.1 = bf16[128,64]{1,0} fusion(%p0), kind=kLoop, calls=%pad
  %all-reduce.1 = (bf16[128,64]{1,0}, f32[8]{0}) all-reduce(%fusion.1, %p1), replica_groups=[1,64]<=[64], to_apply=%add
}
"""
  summary = collectives.summarize(collectives.read(fragment))
  gather, reduce = summary["all-gather"], summary["all-reduce"]
  assert gather.as_all_reduce == 1 and gather.shapes == ((128, 64),)
  assert gather.sent_bytes == pytest.approx(2 * 63 / 64 * 128 * 64 * 2)   # an all-reduce's
  assert reduce.shapes == ((8,),) and reduce.as_all_reduce == 0


def test_an_unread_spelling_of_the_groups_is_an_error():
  with pytest.raises(ValueError, match="replica_groups"):
    collectives.read(HLO.replace("replica_groups={{0,1,2,3}}", "replica_groups=<new>"))


def test_ring_bytes_and_loop_trips():
  found = _by_name()
  gather = found["all-gather.1"]
  assert gather.sent_bytes == pytest.approx(3 / 4 * 128 * 256 * 2)
  reduce = found["all-reduce-start.2"]
  assert reduce.kind == "all-reduce" and reduce.sent_bytes == pytest.approx(2 * 1 / 2 * 8 * 64 * 4)
  scatter = found["reduce-scatter.4"]   # a plain one: the full array is 4 results along dim 0
  assert scatter.full_shapes == (("f32", (8, 64)),)
  looped = found["all-gather.9"]
  assert looped.executions == 28 and looped.trip_count_known
  summary = collectives.summarize(found.values())
  assert summary["all-gather"].count == 2 and summary["all-gather"].executions == 29
  assert summary["all-gather"].sent_bytes == pytest.approx(
      3 / 4 * (128 * 256 * 2 + 28 * 64 * 64 * 2))
  assert summary["reduce-scatter"].count == 2
  assert list(summary) == ["all-gather", "reduce-scatter", "all-reduce"]


def test_ideal_bytes_of_fsdp_and_data_parallel():
  """Two weights on a data 2 x fsdp 4 mesh: one sharded over fsdp, one replicated."""
  mesh = _mesh((2, 4, 1))
  abstract = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32),
              "b": jax.ShapeDtypeStruct((32,), jnp.float32)}
  shardings = {"w": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P())}
  dtypes = {"w": jnp.bfloat16, "b": jnp.float32}
  ideal = collectives.ideal(abstract, shardings, dtypes, mesh, gathers=2)
  w, b = 64 * 32 * 2, 32 * 4
  assert ideal["all-gather"] == pytest.approx(2 * 3 / 4 * w)
  assert ideal["reduce-scatter"] == pytest.approx(3 / 4 * w)
  # w's shard over the 2 data replicas; b over all 8 batch shards
  assert ideal["all-reduce"] == pytest.approx(2 * 1 / 2 * w / 4 + 2 * 7 / 8 * b)


def test_gathered_once_changes_no_value_or_gradient():
  """The custom VJP is the identity with the identity's transpose: a loss that reads the
  weights three times has the same value and gradient on an fsdp 8 mesh as without it."""
  mesh = _mesh((1, 8, 1))
  shardings = {"w": NamedSharding(mesh, P("fsdp", None)), "v": NamedSharding(mesh, P(None, "fsdp"))}
  rng = np.random.default_rng(0)
  params = {"w": jax.device_put(rng.normal(size=(16, 8)).astype(np.float32), shardings["w"]),
            "v": jax.device_put(rng.normal(size=(8, 16)).astype(np.float32), shardings["v"])}
  x = rng.normal(size=(4, 16)).astype(np.float32)

  def loss(params, gather):
    if gather:
      params = parallel.gathered_once(params, shardings, ("data", "fsdp"))
    h = jnp.tanh(x @ params["w"]) @ params["v"]
    return jnp.sum(jnp.tanh(h @ params["w"]) ** 2) + jnp.sum(params["v"] ** 2)

  plain = jax.jit(jax.value_and_grad(lambda p: loss(p, False)))(params)
  once = jax.jit(jax.value_and_grad(lambda p: loss(p, True)), out_shardings=(None, shardings))(
      params)
  np.testing.assert_allclose(once[0], plain[0], rtol=1e-6)
  for key in params:
    np.testing.assert_allclose(once[1][key], plain[1][key], rtol=1e-5, atol=1e-5)
    assert once[1][key].sharding.spec == shardings[key].spec


def test_without_axes_keeps_the_other_axes():
  mesh = _mesh((2, 2, 2))
  sharding = NamedSharding(mesh, P(("data", "fsdp"), "tensor", None))
  assert parallel.without_axes(sharding, ("data", "fsdp")).spec == P(None, "tensor", None)
  assert parallel.without_axes(sharding, ("data",)).spec == P("fsdp", "tensor", None)
