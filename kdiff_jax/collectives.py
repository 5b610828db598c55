"""What a compiled program's collectives send, read from its HLO as the chip runs it, and the ideal.

  found = collectives.read(compiled.as_text(), mesh)   # [Collective], one per HLO instruction
  table = collectives.summarize(found)                 # kind -> Summary (count, bytes per chip)
  ideal = collectives.ideal(abstract_params, shardings, compute_dtypes, mesh, gathers=2)

**Reading the HLO.** Each collective instruction (`all-gather`, `all-reduce`, `reduce-scatter`,
`all-to-all`, `collective-permute`, or the `-start` of its async form) is one `Collective`. Two
things the instruction alone does not say are read from around it:

* *Fusions.* libtpu forms an FSDP gradient reduction as a fusion computation (named
  `%all-reduce-scatter*`, emitter `SingleInputAllReduceScatterFusion`) whose body is an
  `all-reduce` of the parameter's full shape and whose ROOT is the `dynamic-slice` of the chip's
  shard; several gradients are often combined into one such fusion, a tuple all-reduce whose
  arrays are each sliced. The chip runs a reduce-scatter, so an all-reduced array whose only
  user is a `dynamic-slice` (directly, or through the `get-tuple-element` of a combined
  all-reduce) is read as a reduce-scatter of that full shape to the slice's shape.
* *All-gathers done by all-reduce.* Where libtpu has no native all-gather for a group (every
  64-chip group of a v5p-128's 4x4x4 torus, in libtpu 0.0.42), it places each chip's shard in
  zeros (`dynamic-update-slice`) and all-reduces the full array. That is an all-gather the chip
  runs as an all-reduce: kind 'all-gather', `as_all_reduce`, and the all-reduce's bytes.
* *Async chains.* libtpu runs a collective asynchronously by carrying it through a chain of
  fusions (`async_collective_fusion*`) that overlap it with compute; each fusion of the chain
  holds a copy of the instruction, marked with the chain's `chain_id` attribute. The chip runs
  it once: instructions of one kind, chain_id and shapes are one collective. (channel_id does not
  tell: libtpu gives many distinct reduce-scatter fusions the same one.)
* *Loops.* A collective inside a `while` body (`lax.scan` over the blocks) runs once per trip:
  `executions` multiplies the trip counts of the loops around it: XLA's `known_trip_count`, else
  the N of a `counter < N` condition (a scan's), else 1 and `trip_count_known` is False.

**Bytes per chip under a ring model.** For a group of n chips and the collective's full array
of S bytes (the gathered result, the reduced input), each chip sends, and receives as much:
all-gather and reduce-scatter (n−1)/n·S, all-reduce 2(n−1)/n·S (a reduce-scatter then an
all-gather), all-to-all (n−1)/n·S, collective-permute S. The groups come from `replica_groups`
in any of XLA's spellings (explicit `{{0,1},{2,3}}`, iota `[2,2]<=[4]`, and libtpu's named
`mesh['axis_0'=4,'axis_1'=1] {'axis_0'}`, optionally with `device_ids=([4,16]T(1,0))` giving
the devices' order); with the program's mesh the group is named by the mesh
axes it spans (`fsdp`, `data`, ...): a program's device i is `mesh.devices.flat[i]`.

**The ideal** (`ideal`) is what a step must send at the least, per parameter p of B_p compute-dtype
bytes sharded over the batch axes in m_p ways, the remaining batch axes r_p ways:
its gradient reduce-scattered once over the m_p shards ((m_p−1)/m_p·B_p), the shard all-reduced
over the other r_p (2(r_p−1)/r_p·B_p/m_p: plain data parallelism when m_p = 1), and the weight
all-gathered `gathers` times ((m_p−1)/m_p·B_p each: forward and backward, one more with remat).
The 'tensor' axis's activation traffic is not modelled.
"""
import dataclasses
import math
import re

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")
_CALLEES = re.compile(r"\b(calls|body|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONDITION = re.compile(r"\bcondition=%([\w.\-]+)")
_CHAIN = re.compile(r'\bchain_id="(\d+)"')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{((?:\{[0-9,\s]*\},?\s*)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]"
                          r"(?:,\s*device_ids=\(\[([0-9,]+)\](?:T\(([0-9,]+)\))?\))?\s*\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of the program, as the chip runs it."""
  kind: str                  # one of KINDS
  name: str                  # its HLO name
  full_shapes: tuple         # ((dtype, shape), ...) of the full array (gathered / pre-reduction)
  result_shapes: tuple       # ((dtype, shape), ...) of what one chip ends with
  group_size: int            # chips per replica group (1: no communication)
  axes: tuple                # the mesh axes the group spans; ('?',) when unknown
  executions: int            # times it runs per program run (loops around it)
  trip_count_known: bool = True
  as_all_reduce: bool = False   # an all-gather the chip runs as an all-reduce of zero-padded shards

  @property
  def runs_as(self) -> str:
    """The collective the chip runs: `kind`, or an all-reduce for `as_all_reduce`."""
    return "all-reduce" if self.as_all_reduce else self.kind

  @property
  def full_bytes(self) -> int:
    return _nbytes(self.full_shapes)

  @property
  def result_bytes(self) -> int:
    return _nbytes(self.result_shapes)

  @property
  def sent_bytes(self) -> float:
    """Bytes one chip sends (and receives) per execution, ring model (module docstring)."""
    return ring_bytes(self.runs_as, self.full_bytes, self.group_size)


@dataclasses.dataclass(frozen=True)
class Summary:
  """The collectives of one kind: how many, what they move per chip per program run."""
  count: int            # instructions in the HLO
  executions: int       # their executions per program run
  result_bytes: float   # per chip, per program run
  sent_bytes: float     # per chip, per program run, ring model
  shapes: tuple         # result shapes, one per instruction
  axes: tuple           # the mesh axes their groups span, sorted
  as_all_reduce: int = 0   # how many of them the chip runs as all-reduces


def ring_bytes(kind: str, full_bytes: float, group_size: int) -> float:
  """Bytes one chip sends for a collective over `group_size` chips of a `full_bytes` array."""
  n = group_size
  if n <= 1:
    return 0.0
  if kind == "all-reduce":
    return 2 * (n - 1) / n * full_bytes
  if kind == "collective-permute":
    return float(full_bytes)
  return (n - 1) / n * full_bytes


def _arrays(text: str) -> tuple:
  return tuple((dtype, tuple(int(d) for d in dims.split(",") if d))
               for dtype, dims in _ARRAY.findall(text))


def _nbytes(arrays) -> int:
  return sum(_BYTES[dtype] * math.prod(shape) for dtype, shape in arrays)


def _split_shape(rest: str) -> tuple:
  """(shape text, the text after it) of an instruction's right-hand side."""
  if rest.startswith("("):
    depth = 0
    for i, char in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:]
  shape, _, after = rest.partition(" ")
  return shape, " " + after


def _operands(text: str) -> list:
  """The %names inside an instruction's operand list (up to its closing parenthesis)."""
  depth = 1
  for i, char in enumerate(text):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return re.findall(r"%([\w.\-]+)", text[:i])
  return re.findall(r"%([\w.\-]+)", text)


@dataclasses.dataclass
class _Instruction:
  name: str
  shape: str
  opcode: str
  operands: list
  line: str
  root: bool


def parse(hlo_text: str) -> tuple:
  """({computation: [_Instruction]}, the ENTRY computation's name) of HLO module text (or of a
  fragment of instructions, read as one computation)."""
  computations, entry, current = {}, None, None
  if not re.search(r"^ENTRY\s", hlo_text, re.M):   # a fragment: its lines are one computation
    entry = current = "ENTRY"
    computations[entry] = []
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    instruction = _INSTRUCTION.match(line)
    if current is None or instruction is None:
      continue
    shape, after = _split_shape(line[instruction.end():])
    opcode = _OPCODE.match(after)
    if opcode is None:
      continue
    computations[current].append(_Instruction(
        instruction.group(2), shape, opcode.group(1), _operands(after[opcode.end():]), line,
        bool(instruction.group(1))))
  return computations, entry


def _executions(computations: dict, entry: str) -> tuple:
  """({computation: runs per program run}, {computation: every loop trip count was known})."""
  runs, known = {entry: 1}, {entry: True}
  order = [entry]
  for name in order:   # breadth first; a computation is reached from the ones that call it
    for instruction in computations.get(name, ()):
      callees = [c for _, c in _CALLEES.findall(instruction.line)]
      branches = _BRANCHES.search(instruction.line)
      if branches:
        callees += re.findall(r"%([\w.\-]+)", branches.group(1))
      trips, trip_known = 1, True
      if instruction.opcode == "while":
        condition = _CONDITION.search(instruction.line)
        trip = _TRIP_COUNT.search(instruction.line)
        trips = int(trip.group(1)) if trip else (
            _counted_trips(computations.get(condition.group(1), [])) if condition else None)
        trips, trip_known = (trips, True) if trips is not None else (1, False)
        if condition:
          callees.append(condition.group(1))
      for callee in callees:
        if callee not in computations:
          continue
        runs[callee] = runs.get(callee, 0) + runs[name] * trips
        known[callee] = known.get(callee, True) and known[name] and trip_known
        if callee not in order:
          order.append(callee)
  return runs, known


def _counted_trips(condition) -> int | None:
  """N of a loop condition `ROOT compare(counter, constant(N)), direction=LT` (lax.scan's and
  fori_loop's, the counter from 0 by 1), else None."""
  constants = {i.name: re.search(r"constant\((\d+)\)", i.line) for i in condition
               if i.opcode == "constant"}
  for instruction in condition:
    if instruction.root and instruction.opcode == "compare" and "direction=LT" in instruction.line:
      bound = constants.get(instruction.operands[-1]) if instruction.operands else None
      return int(bound.group(1)) if bound else None
  return None


def _group(line: str) -> tuple:
  """(group size, the device ids of the first group) of an instruction's replica_groups;
  (0, None) when it names none or `{}`: one group of every device. A spelling this does not
  read is an error, never a guess."""
  explicit = _EXPLICIT_GROUPS.search(line)
  if explicit:
    groups = re.findall(r"\{([0-9,\s]*)\}", explicit.group(1))
    first = [int(i) for i in groups[0].replace(" ", "").split(",") if i] if groups else []
    return (len(first), first) if first else (0, None)
  iota = _IOTA_GROUPS.search(line)
  if iota:
    group_shape = [int(d) for d in iota.group(1).split(",")]
    source = [int(d) for d in iota.group(2).split(",")]
    ids = np.arange(math.prod(source)).reshape(source)
    if iota.group(3):
      ids = ids.transpose([int(d) for d in iota.group(3).split(",")])
    ids = ids.reshape(group_shape[0], -1)
    return ids.shape[1], [int(i) for i in ids[0]]
  mesh = _MESH_GROUPS.search(line)
  if mesh:   # named axes over the devices in iota order, or in the order device_ids gives
    sizes = [(name, int(size)) for name, size in re.findall(r"'([\w]+)'=(\d+)", mesh.group(1))]
    spanned = set(re.findall(r"'([\w]+)'", mesh.group(4)))
    ids = np.arange(math.prod(s for _, s in sizes))
    if mesh.group(2):
      ids = ids.reshape([int(d) for d in mesh.group(2).split(",")])
      if mesh.group(3):
        ids = ids.transpose([int(d) for d in mesh.group(3).split(",")])
    ids = ids.reshape([s for _, s in sizes])
    index = tuple(slice(None) if name in spanned else 0 for name, _ in sizes)
    first = ids[index].ravel()
    return len(first), [int(i) for i in first]
  if "replica_groups=" in line:
    raise ValueError("replica_groups in a spelling collectives.py does not read: "
                     + line[line.index("replica_groups="):][:120])
  return 0, None


def _scatter_input(results, line: str, size: int) -> tuple:
  """The input shapes of a reduce-scatter: its results `size` times along `dimensions={d}`."""
  dimension = re.search(r"dimensions=\{(\d+)\}", line)
  d = int(dimension.group(1)) if dimension else 0
  return tuple((dtype, shape[:d] + (shape[d] * size,) + shape[d + 1:]) if len(shape) > d
               else (dtype, shape) for dtype, shape in results)


def _axes(first_group, mesh) -> tuple:
  """The mesh axes along which the devices of a group differ."""
  if mesh is None or first_group is None:
    return ("?",)
  shape = tuple(mesh.devices.shape)
  if max(first_group) >= math.prod(shape):
    return ("?",)
  coords = np.array(np.unravel_index(first_group, shape)).T
  return tuple(axis for i, axis in enumerate(mesh.axis_names) if len(set(coords[:, i])) > 1)


def _padded_shard(instruction, computations) -> bool:
  """Whether an all-reduce's operand places a shard into zeros: a dynamic-update-slice, or a
  fusion whose ROOT is one."""
  while instruction is not None and instruction.opcode == "fusion":
    callee = re.search(r"\bcalls=%([\w.\-]+)", instruction.line)
    body = computations.get(callee.group(1), []) if callee else []
    instruction = next((i for i in body if i.root), None)
  return instruction is not None and instruction.opcode == "dynamic-update-slice"


def _slices(instruction, results, users) -> list:
  """Per array of an all-reduce's result, the (dtype, shape) of the dynamic-slice that is its
  only user (through the get-tuple-element of a combined all-reduce), else None."""
  def only_slice(name):
    used_by = users.get(name, [])
    if len(used_by) == 1 and used_by[0].opcode == "dynamic-slice":
      return _arrays(used_by[0].shape)[0]
    return None
  if not instruction.shape.startswith("("):
    return [only_slice(instruction.name)]
  sliced = [None] * len(results)
  for user in users.get(instruction.name, []):
    index = re.search(r"\bindex=(\d+)", user.line)
    if user.opcode == "get-tuple-element" and index and int(index.group(1)) < len(results):
      sliced[int(index.group(1))] = only_slice(user.name)
  return sliced


def read(hlo_text: str, mesh=None) -> list:
  """Every collective of compiled HLO text as a `Collective` (module docstring). `mesh` (the
  program's) names the axes a group spans and sizes a group of every device; without it such a
  group counts as one chip, sending nothing."""
  computations, entry = parse(hlo_text)
  if entry is None:
    return []
  runs, known = _executions(computations, entry)
  found, chains = [], set()
  for computation, instructions in computations.items():
    if computation not in runs:
      continue
    users, defined = {}, {i.name: i for i in instructions}
    for instruction in instructions:
      for operand in instruction.operands:
        users.setdefault(operand, []).append(instruction)
    for instruction in instructions:
      kind = instruction.opcode.removesuffix("-start")
      if kind not in KINDS:
        continue
      chain = _CHAIN.search(instruction.line)
      if chain:   # one collective of an async chain (module docstring)
        key = (kind, chain.group(1), _arrays(instruction.shape))
        if key in chains:
          continue
        chains.add(key)
      results = _arrays(instruction.shape)
      if instruction.opcode.endswith("-start") and instruction.shape.startswith("("):
        # an async start's tuple holds its operands first, then its results
        operand_count = len(instruction.operands)
        results = results[operand_count:] or results
      size, first = _group(instruction.line)
      if size == 0:   # every device of the program
        size = mesh.devices.size if mesh is not None else 1
        first = list(range(size)) if mesh is not None else None
      full = results
      if kind == "reduce-scatter":   # a plain one: the full array is n results along `dimensions`
        full = _scatter_input(results, instruction.line, size)
      where = (_axes(first, mesh), runs[computation], known[computation])
      if kind == "all-reduce":
        padded = [_padded_shard(defined.get(name), computations)
                  for name in instruction.operands][:len(full)]
        padded += [False] * (len(full) - len(padded))
        if any(padded):   # shards placed in zeros, summed: an all-gather done by all-reduce
          found.append(Collective(
              "all-gather", instruction.name, tuple(f for f, p in zip(full, padded) if p),
              tuple(f for f, p in zip(full, padded) if p), size, *where, as_all_reduce=True))
        sliced = _slices(instruction, results, users)
        scattered = [i for i, part in enumerate(sliced) if part is not None and not padded[i]]
        if scattered:   # libtpu's reduce-scatter fusion: an all-reduce, then the slice
          found.append(Collective(
              "reduce-scatter", instruction.name, tuple(full[i] for i in scattered),
              tuple(sliced[i] for i in scattered), size, *where))
        full = tuple(full[i] for i in range(len(full)) if i not in scattered and not padded[i])
        results = full
        if not full:
          continue
      found.append(Collective(kind, instruction.name, tuple(full), tuple(results), size, *where))
  return found


def summarize(found) -> dict:
  """kind -> Summary of `read`'s collectives, in KINDS order."""
  table = {}
  for kind in KINDS:
    mine = [c for c in found if c.kind == kind]
    if mine:
      table[kind] = Summary(
          count=len(mine), executions=sum(c.executions for c in mine),
          result_bytes=sum(c.result_bytes * c.executions for c in mine),
          sent_bytes=sum(c.sent_bytes * c.executions for c in mine),
          shapes=tuple(s for c in mine for _, s in c.result_shapes),
          axes=tuple(sorted({a for c in mine for a in c.axes})),
          as_all_reduce=sum(c.as_all_reduce for c in mine))
  return table


def ideal(abstract_params, shardings, compute_dtypes, mesh, *, gathers: int,
          batch_axes=("data", "fsdp")) -> dict:
  """kind -> bytes one chip must send per step at the least (module docstring), for parameters
  `abstract_params` in `shardings` whose gradients and gathered copies are in `compute_dtypes`
  (a matching pytree of dtypes), the batch split over `batch_axes` of `mesh`."""
  import jax   # the reading above needs no JAX
  sent = {"all-gather": 0.0, "reduce-scatter": 0.0, "all-reduce": 0.0}
  batch = [a for a in batch_axes if mesh.shape[a] > 1]
  for array, sharding, dtype in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(shardings),
                                    jax.tree.leaves(compute_dtypes)):
    nbytes = math.prod(array.shape) * np.dtype(dtype).itemsize
    sharded = {a for entry in sharding.spec if entry is not None
               for a in ((entry,) if isinstance(entry, str) else entry)}
    m = math.prod(mesh.shape[a] for a in batch if a in sharded)
    r = math.prod(mesh.shape[a] for a in batch if a not in sharded)
    sent["reduce-scatter"] += ring_bytes("reduce-scatter", nbytes, m)
    sent["all-reduce"] += ring_bytes("all-reduce", nbytes / m, r)
    sent["all-gather"] += gathers * ring_bytes("all-gather", nbytes, m)
  return {kind: value for kind, value in sent.items() if value}
