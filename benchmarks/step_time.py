"""Train-step time, images/s, MFU and memory of the project's own train step, per DiT size x
objective x compute dtype x batch x remat x attention implementation. Prints a Markdown table.

  python benchmarks/step_time.py --sizes=B,L,XL --batch_sizes=256 --compute_dtypes=bfloat16
  python benchmarks/step_time.py --objectives=flow,imm,meanflow,tvm   # each against flow's step
  python benchmarks/step_time.py --sizes=XL --largest_batch --remats=none,full   # what fits
  python benchmarks/step_time.py --sizes=T --batch_sizes=8 --image_size=8 --steps=2   # CPU check

Each row builds the run's own step (train_state / train: setup, init_state, make_train_step,
the same jitted, donated, sharded step as training) on synthetic data, compiles it once (the
compile time is a column; no persistent compilation cache), runs --warmup steps, then times
--steps steps one by one (each waits for the device): the median and the spread (fastest,
slowest) of those.

Objectives come from a config, so any registered objective can be timed: 'flow' is the default
config's velocity flow matching, 'imm' configs/imm_in256.py (M = 4), and another name reads
configs/<name>_in256.py, else configs/<name>_digits.py, else the default config with
objective.name = <name> ('name=configs/file.py' names the file). The file's objective section
and its model options (second time embedder, time scale, norms, ...) are kept; data, size (with
the size's number of heads), patch, dtype, remat, attention, batch and mesh come from the
flags. An objective that is not registered, a config that is refused, or a step that fails
prints its reason in the row, and the sweep goes on. The last column is the time per image
relative to the first objective's at the same model, batch, dtype, remat and attention (with
--largest_batch, each at its own largest batch).

Columns:
  model FLOPs/img   analytic: k·MACs, MACs = dit.forward_macs (the formula is printed above the
                    table) and k the FLOPs of one image's step per forward MAC (FLOP_FACTORS)
  XLA FLOPs/img     XLA's cost analysis of the compiled step (forward, backward, optimizer), per
                    image: what the compiler counts, beside the analytic figure. It counts a
                    loop's body once, so with --scan_blocks it misses all blocks but one: the
                    cell then says '(scan)' and is no check of the analytic figure
  MFU               model FLOPs/img · images/s / (the devices' bf16 dense peak, hardware.py;
                    --peak_tflops overrides; 'n/a' for a device not in the table, e.g. a CPU)
  memory            memory_analysis of the compiled step per device: arguments + outputs (not
                    aliased) + temporaries
  device peak       the device's peak_bytes_in_use since the process started (GPU/TPU memory
                    statistics; 'n/a' on a CPU): an upper bound over the rows run so far
  compile           lower + compile of the step, seconds

--largest_batch replaces --batch_sizes by the largest batch (a multiple of devices x the
objective's group size) whose compiled step fits the device's memory (its bytes_limit, else the
datasheet HBM, or --memory_gb) times --memory_fraction: doubling from --batch_sizes[0], then
bisecting until the bounds are within --bisect_tolerance; each probe is one compile.
"""
import contextlib
import dataclasses
import importlib
import importlib.util
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import tables  # noqa: E402
from kdiff_jax import hardware, objectives, parallel  # noqa: E402
from kdiff_jax.models import dit  # noqa: E402

# setup / init_state / make_train_step: kdiff_jax/train_state.py, or train.py before the split.
steps = importlib.import_module("kdiff_jax.train_state"
                                if importlib.util.find_spec("kdiff_jax.train_state")
                                else "kdiff_jax.train")

flags.DEFINE_list("sizes", ["T", "XS", "S"], "DiT sizes.")
flags.DEFINE_list("batch_sizes", ["16", "64"], "Global batch sizes (--largest_batch: the first "
                  "is where the search starts).")
flags.DEFINE_integer("patch_size", 2, "Patch size.")
flags.DEFINE_integer("image_size", 32, "Input height = width.")
flags.DEFINE_integer("channels", 4, "Input channels (4 = SD-VAE latents).")
flags.DEFINE_integer("num_classes", 1000, "Label classes.")
flags.DEFINE_list("compute_dtypes", ["float32"], "Matmul dtypes: float32 | bfloat16 (the "
                  "parameters and optimizer stay float32).")
flags.DEFINE_list("remats", ["none"], "model.remat values: none | full | dots.")
flags.DEFINE_list("attentions", ["xla"], "model.attention values: xla | cudnn (GPU, bfloat16).")
flags.DEFINE_bool("scan_blocks", False, "model.scan_blocks: one lax.scan over the blocks.")
flags.DEFINE_list("objectives", ["flow"], "Objectives: flow | imm | meanflow | tvm | any "
                  "registered name, or name=configs/file.py.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after the compile.")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_float("peak_tflops", None, "Peak FLOP/s per device in TFLOP/s for MFU (default: "
                   "the device's bf16 dense peak from kdiff_jax/hardware.py).")
flags.DEFINE_list("flop_factors", [], "Overrides of FLOP_FACTORS, name=k: model FLOPs per "
                  "image = k·forward MACs.")
flags.DEFINE_bool("largest_batch", False, "Find the largest batch that fits, and time it.")
flags.DEFINE_float("memory_gb", None, "Device memory for --largest_batch (default: the "
                   "device's bytes_limit, else its datasheet HBM).")
flags.DEFINE_float("memory_fraction", 0.92, "--largest_batch: the share of memory a step may "
                   "take (headroom for fragmentation and the runtime).")
flags.DEFINE_float("bisect_tolerance", 1.15, "--largest_batch: stop when hi/lo is below this.")
flags.DEFINE_bool("compilation_cache", False, "Let compiles use JAX's persistent compilation "
                  "cache when one is configured (the compile column then shows cache hits); by "
                  "default every compile is a real one.")
flags.DEFINE_string("output", "", "Also write the table (Markdown) to this file.")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Model FLOPs of one image's training step per forward multiply-accumulate (2 FLOPs per MAC;
# a backward pass costs two forwards). Nominal counts of the network passes each loss makes.
FLOP_FACTORS = {
    "flow": 6,        # forward 2 + backward 4
    "kdiff": 6,       # as flow
    "imm": 8,         # + the target pass, forward only: 2
    "meanflow": 8,    # + the JVP's tangent pass (stop-gradient target: no backward through it): 2
    "tvm": 22,        # online F with its s-JVP (2 + 2) and the backward through both (8), a second
                      # online pass F(y_s') forward and backward (6), the teacher on a doubled
                      # batch, forward (4)
}
PRESETS = {"flow": "configs/default.py", "imm": "configs/imm_in256.py"}
# The model inputs an objective needs when no configs/<name>_*.py exists (a field the schema
# does not have yet is left out).
MODEL_INPUTS = {"meanflow": {"second_time_embedder": True, "time_scale": 1.0},
                "tvm": {"second_time_embedder": True, "guidance_embedder": True}}
FORMULA = ("MACs/img = depth·(T·4D² + 2T²·D + T·2r·D² + 6D²) + 2T·p²C·D + 2D² "
           "+ e·(256D + D²)  "
           "[T = (image/p)² tokens, D hidden, r mlp_ratio, e time embedders; dit.forward_macs]; "
           "model FLOPs/img = k·MACs, k = {}")


def flop_factors() -> dict:
  factors = dict(FLOP_FACTORS)
  for item in FLAGS.flop_factors:
    name, _, value = item.partition("=")
    if not value:
      raise ValueError(f"--flop_factors={item!r}: give name=k, e.g. tvm=22")
    factors[name] = float(value)
  return factors


def preset_path(spec: str) -> tuple[str, str, bool]:
  """(objective label, config file, whether objective.name must be set to the label) of an
  --objectives entry."""
  name, _, path = spec.partition("=")
  if path:
    return name, path, False
  if name in PRESETS:
    return name, PRESETS[name], False
  for candidate in (f"configs/{name}_in256.py", f"configs/{name}_digits.py"):
    if os.path.exists(os.path.join(ROOT, candidate)):
      return name, candidate, False
  return name, PRESETS["flow"], True


def load_config(path: str):
  module = os.path.splitext(os.path.relpath(os.path.join(ROOT, path), ROOT))[0].replace("/", ".")
  return importlib.import_module(module).get_config()


@dataclasses.dataclass(frozen=True)
class Case:
  size: str
  spec: str          # the --objectives entry: name or name=configs/file.py
  compute_dtype: str
  remat: str
  attention: str

  @property
  def objective(self) -> str:   # the label in the table
    return preset_path(self.spec)[0]


def benchmark_config(case: Case, batch_size: int):
  """The preset of case.objective with the benchmark's data, model, batch and mesh."""
  name, path, set_name = preset_path(case.spec)
  config = load_config(path)
  if set_name:
    config.objective.name = name
    for field, value in MODEL_INPUTS.get(name, {}).items():
      if field in config.model:
        setattr(config.model, field, value)
  config.data.name = "synthetic"
  config.data.image_size = FLAGS.image_size
  config.data.channels = FLAGS.channels
  config.data.num_classes = FLAGS.num_classes
  config.model.name = "dit"
  config.model.size = case.size
  config.model.patch_size = FLAGS.patch_size
  config.model.compute_dtype = case.compute_dtype
  config.model.remat = case.remat
  config.model.attention = case.attention
  config.model.scan_blocks = FLAGS.scan_blocks
  if "num_heads" in config.model:   # the size's heads, so that every objective times one shape
    config.model.num_heads = 0
  config.training.batch_size = batch_size
  config.training.ema_decays = (0.9999,)
  config.training.per_step_metrics = ()
  config.eval.fid_every = 0
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.dcn_data = -1, 1, 1, 1
  return config


def model_macs(config) -> int:
  depth, hidden_size, _ = dit.SIZES[config.model.size][:3]
  return dit.forward_macs(input_size=config.data.image_size, in_channels=config.data.channels,
                          patch_size=config.model.patch_size, hidden_size=hidden_size,
                          depth=depth, mlp_ratio=config.model.mlp_ratio,
                          second_time_embedder=config.model.second_time_embedder)


def _no_compilation_cache():
  if FLAGS.compilation_cache:
    return contextlib.nullcontext()
  from jax._src import config as jax_config   # present in jax 0.10 and 0.11
  context = getattr(jax_config, "enable_compilation_cache", None)
  return context(False) if context is not None else contextlib.nullcontext()


def _batch(config, mesh, abstract: bool):
  sharding = parallel.batch_sharding(mesh, config.mesh.rules)
  batch = config.training.batch_size
  shape = (batch, config.data.image_size, config.data.image_size, config.data.channels)
  if abstract:
    return {"image": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding),
            "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)}
  rng = np.random.default_rng(0)
  host = {"image": rng.standard_normal(shape, dtype=np.float32),
          "label": rng.integers(0, config.data.num_classes, batch).astype(np.int32)}
  return jax.device_put(host, sharding)


def compile_step(config):
  """(setup, compiled step, compile seconds, per-device bytes, XLA FLOPs per device)."""
  setup = steps.setup(config)
  step = steps.make_train_step(setup)
  start = time.perf_counter()
  with _no_compilation_cache():
    compiled = step.lower(setup.abstract_state, _batch(config, setup.mesh, abstract=True)).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  total = None
  if memory is not None:
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", float("nan")))
  return setup, compiled, seconds, total, flops


def time_steps(setup, compiled):
  """Seconds of each of FLAGS.steps steps after FLAGS.warmup untimed ones."""
  state = steps.init_state(setup)
  batch = _batch(setup.config, setup.mesh, abstract=False)
  for _ in range(FLAGS.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics) if FLAGS.warmup else state)
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(f"loss {loss} after {FLAGS.warmup + FLAGS.steps} steps")
  return times


def memory_limit() -> float | None:
  """Bytes a step may take on one device: --memory_gb, the device's bytes_limit, its HBM."""
  if FLAGS.memory_gb:
    return FLAGS.memory_gb * 1e9 * FLAGS.memory_fraction
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return stats["bytes_limit"] * FLAGS.memory_fraction
  spec = hardware.spec(device.device_kind)
  if spec and spec.hbm_bytes:
    return spec.hbm_bytes * FLAGS.memory_fraction
  return None


def batch_unit(case: Case) -> int:
  try:
    config = benchmark_config(case, jax.device_count())
    group = objectives.build(config, lambda *a, **k: None).group_size
  except Exception:  # noqa: BLE001 - the first compile says what is wrong
    group = 1
  return jax.device_count() * group


def bisect(fits, start: int, unit: int, tolerance: float) -> tuple[int, int]:
  """(the largest multiple of `unit` for which fits(batch) holds, to within hi/lo < tolerance,
  the number of probes): doubling from `start` (rounded down to a multiple of unit, at least
  unit), then bisection; 0 when even `unit` does not fit. fits must be monotone."""
  probes = 0

  def probe(batch):
    nonlocal probes
    probes += 1
    return fits(batch)

  lo, hi = 0, max(unit, start // unit * unit)
  while probe(hi):
    lo, hi = hi, hi * 2
  while lo == 0 or hi / lo >= tolerance:
    middle = (lo + hi) // 2 // unit * unit
    if middle <= lo:
      break
    lo, hi = (middle, hi) if probe(middle) else (lo, middle)
  return lo, probes


def largest_batch(case: Case, start: int, limit: float) -> tuple[int, int]:
  """(largest batch whose compiled step fits `limit` bytes per device, number of compiles)."""
  def fits(batch):
    try:
      _, _, _, total, _ = compile_step(benchmark_config(case, batch))
    except Exception as error:  # noqa: BLE001 - a compiler out-of-memory error is a "no"
      if "RESOURCE_EXHAUSTED" in str(error) or "memory" in str(error).lower():
        return False
      raise
    return total is not None and total <= limit

  return bisect(fits, start, batch_unit(case), FLAGS.bisect_tolerance)


def _gb(nbytes):
  return "n/a" if nbytes is None else f"{nbytes / 1e9:.2f}"


def device_peak() -> float | None:
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return (stats or {}).get("peak_bytes_in_use")


HEADER = ("| model | objective | dtype | remat | attention | params | batch | step ms (median) | "
          "spread ms (min-max) | images/s | model GFLOP/img | XLA GFLOP/img | MFU | memory GB | "
          "device peak GB | compile s | step / {first} step (per image) |")


def run_case(case: Case, batch: int, peak: float | None, factors: dict, reference: dict,
             note: str = "") -> str:
  config = benchmark_config(case, batch)
  label = f"| DiT-{case.size}/{FLAGS.patch_size} | {case.objective} | {case.compute_dtype} | " \
          f"{case.remat} | {case.attention} |"
  name = config.objective.name
  if name not in objectives.MODULES:
    return f"{label} | {batch} | not registered: objective.name={name!r} is not in " \
           f"{sorted(objectives.MODULES)} |"
  try:
    setup, compiled, compile_seconds, total, xla_flops = compile_step(config)
    times = time_steps(setup, compiled)
  except Exception as error:  # noqa: BLE001 - a refused config or a failed step is a result
    message = str(error).split("\n")[0][:200].replace("|", "/")
    return f"{label} | {batch} | {type(error).__name__}: {message} |"
  median = float(np.median(times))
  images = batch / median
  factor = factors.get(name, factors.get(case.objective))
  model_flops = factor * model_macs(config) if factor else None
  devices = jax.device_count()
  scanned = " (scan)" if FLAGS.scan_blocks else ""   # XLA counts the scan's body once
  mfu = (f"{model_flops * images / (peak * devices):.1%}" if model_flops and peak else "n/a")
  # Per image, so that objectives at their own largest batches compare too.
  key = (case.size, None if FLAGS.largest_batch else batch, case.compute_dtype, case.remat,
         case.attention)
  reference.setdefault(key, median / batch)
  return (f"{label} {setup.model.num_params / 1e6:.1f}M | {batch}{note} | {median * 1e3:.1f} | "
          f"{min(times) * 1e3:.1f}-{max(times) * 1e3:.1f} | {images:.1f} | "
          f"{model_flops / 1e9 if model_flops else float('nan'):.4g} | "
          f"{xla_flops * devices / batch / 1e9:.4g}{scanned} | {mfu} | {_gb(total)} | "
          f"{_gb(device_peak())} | {compile_seconds:.1f} | {median / batch / reference[key]:.2f} |")


def main(argv):
  del argv
  device = jax.devices()[0]
  spec = hardware.spec(device.device_kind)
  peak = FLAGS.peak_tflops * 1e12 if FLAGS.peak_tflops else (spec.bf16_flops if spec else None)
  factors = flop_factors()
  peak_text = f"{peak / 1e12:.0f} TFLOP/s per device" if peak else "unknown (MFU n/a)"
  lines = [
      f"devices: {jax.device_count()} x {device.device_kind} ({jax.default_backend()}), "
      f"jax {jax.__version__}; peak {peak_text}; {FLAGS.image_size}x{FLAGS.image_size}"
      f"x{FLAGS.channels}, patch {FLAGS.patch_size}, scan_blocks={FLAGS.scan_blocks}; "
      f"{FLAGS.warmup} warm-up + {FLAGS.steps} timed steps",
      FORMULA.format(", ".join(f"{n} {k:g}" for n, k in factors.items())),
      "",
      HEADER.format(first=preset_path(FLAGS.objectives[0])[0]),
      "|" + "---|" * (HEADER.count("|") - 1),
  ]
  with tables.table_writer(FLAGS.output, lines) as emit:
    limit = memory_limit() if FLAGS.largest_batch else None
    if FLAGS.largest_batch and limit is None:
      raise app.UsageError("--largest_batch needs the device's memory: pass --memory_gb")
    reference = {}
    for size in FLAGS.sizes:
      for dtype in FLAGS.compute_dtypes:
        for remat in FLAGS.remats:
          for attention in FLAGS.attentions:
            batches = [int(b) for b in FLAGS.batch_sizes]
            for batch in ([None] if FLAGS.largest_batch else batches):
              for objective in FLAGS.objectives:
                case = Case(size, objective, dtype, remat, attention)
                note = ""
                if FLAGS.largest_batch:
                  try:
                    batch, probes = largest_batch(case, batches[0], limit)
                  except Exception as error:  # noqa: BLE001
                    batch, probes = 0, 0
                    note = f" ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
                  if not batch:
                    row = (f"| DiT-{size}/{FLAGS.patch_size} | {case.objective} | {dtype} | "
                           f"{remat} | {attention} | | none fits{note} |")
                    emit(row)
                    continue
                  note = f" (largest; {probes} compiles)"
                emit(run_case(case, batch, peak, factors, reference, note))


if __name__ == "__main__":
  app.run(main)
