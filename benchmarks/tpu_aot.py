"""Compile a config's train step and sampler for real TPU slices, without a TPU, and show what fits.

  pip install -r requirements-tpu.txt          # libtpu: the TPU compiler (no TPU needed)
  JAX_PLATFORMS=cpu python benchmarks/tpu_aot.py --config=configs/imm_in256.py \
      --topologies=v4:2x2x4,v5p:4x4x4,v5e:16x16 --variants=plain,remat,scan,remat+scan
  ... --config.mesh.data=2 --config.mesh.fsdp=128   # any config field, as for main.py
  ... --largest_batch                              # also bisect the largest global batch that fits

For each topology (hardware.tpu_slice: one jax device per chip, as a TPU VM runs it) and variant
(each sets model.remat and model.scan_blocks whatever the config had: 'plain' none and unrolled,
'remat' dots, 'scan' scanned, 'remat+scan' both; 'config' keeps the config's own, e.g.
imf_in256's full remat), the train step of train_state.py is
lowered with the run's abstract state and batch and compiled by libtpu's XLA for that slice, and
so is the FID / sample-grid sampler (sampling.build, batch-sharded, eval.batch_size). Printed, per
chip: HBM of arguments, outputs, temporaries and their total (outputs aliased to donated
arguments counted once) against the chip's HBM; XLA's FLOPs; the collectives of the compiled HLO
as the chip runs them (kdiff_jax/collectives.py: kind, instructions, executions per step, the
GB each chip sends under a ring model against the step's ideal, the mesh axes; docs/sharding.md
says how to read them); compile time. Estimates, labelled as such: FLOPs / datasheet peak (the
step's floor at 100% MFU), the collectives' sent bytes / half the ICI bandwidth (one way, no
overlap), and their ratio. XLA's cost analysis counts a while loop's body once, so with scan the
FLOPs (and the estimates from them) are per block pass, not per step: read FLOPs from a plain
variant (the collectives are per step either way). --hlo_dir writes each train step's HLO
text, to read what a figure came from. The largest arrays that no mesh axis shards close the
table.

A slice whose compile exceeds its HBM is reported with the compiler's own figure and the memory
it asked for; --largest_batch then searches multiples of the batch unit (batch shards x group
size) by doubling and bisection, at most --bisect_compiles compiles, and prints the bracket.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the suite's CPU backend; topologies need no TPU

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from kdiff_jax import aot, hardware, parallel  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Experiment config (overrides as for main.py).")
flags.DEFINE_list("topologies", ["v5p:4x4x4"], "TPU slices, <generation>:<shape>.")
flags.DEFINE_list("variants", ["plain"], "plain | remat | scan | remat+scan | config.")
flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (sets mesh.dcn_data).")
flags.DEFINE_bool("sampler", True, "Also compile the batch-sharded sampler (eval.batch_size).")
flags.DEFINE_bool("largest_batch", False, "Bisect the largest global batch that fits.")
flags.DEFINE_integer("bisect_compiles", 4, "At most this many compiles per bisection.")
flags.DEFINE_string("hlo_dir", "", "Write each compiled train step's HLO text here.")
FLAGS = flags.FLAGS

def variant_config(config, variant: str, batch_size: int | None = None):
  config = config.copy_and_resolve_references()
  config.data.name = "synthetic"   # same shapes; nothing is read
  parts = set(variant.split("+")) - {"plain", "config"}
  if parts - {"remat", "scan"}:
    raise ValueError(f"--variants: {variant!r}; allowed plain, remat, scan, remat+scan, config")
  if variant != "config":   # each variant sets both, whatever the config had
    config.model.remat = "dots" if "remat" in parts else "none"
    config.model.scan_blocks = "scan" in parts
  if batch_size:
    config.training.batch_size = batch_size
  config.mesh.dcn_data = FLAGS.num_slices
  return config


def fits_hbm(compiled: aot.Compiled, chip) -> bool:
  """Compiled, and the memory analysis's total per chip within the chip's HBM (libtpu compiled a
  TVM-XL/2 512 step needing 112 GB on a 95 GB v5p without an error)."""
  return compiled.ok and compiled.total <= chip.hbm_bytes


def largest_batch(config, variant, devices, chip, unit, known_fit, known_fail):
  """(largest batch seen to fit, smallest seen not to) from doubling, then bisection."""
  fits, fails = known_fit, known_fail
  for _ in range(FLAGS.bisect_compiles):
    if fails is None:
      trial = 2 * fits
    elif fits is None:
      trial = max(unit, fails // 2 // unit * unit)
    else:
      trial = (fits + fails) // 2 // unit * unit
      if trial <= fits:
        break
    if trial == fails:
      break
    compiled = aot.compile_train_step(variant_config(config, variant, trial), devices)[1]
    ok = fits_hbm(compiled, chip)
    print(f"    bisect: batch {trial} {'fits' if ok else 'does not fit'}"
          f"{f' ({_gb(compiled.total)} GB per chip)' if compiled.ok else ''}", flush=True)
    fits, fails = (trial, fails) if ok else (fits, trial)
    if fits is None and trial == unit:
      break
  return fits, fails


def _gb(nbytes: float) -> str:
  return f"{nbytes / 1e9:.2f}"


def collective_time(sent_bytes: float, chip) -> float:
  """Seconds to send `sent_bytes` per chip at the chip's ICI bandwidth one way (half the
  datasheet's bidirectional figure: a ring chip sends and receives as much), no overlap."""
  return sent_bytes / (chip.ici_bytes_per_second / 2) if chip.ici_bytes_per_second else None


def collectives_cell(compiled: aot.Compiled, ideal: dict | None) -> str:
  """'kind count(runs) sent GB [/ ideal GB = ratio] (axes)' per kind, then the total against the
  ideal's total. A kind whose ideal is under 1% of the ideal total (a few scalars) gets no ratio."""
  cells = []
  floor = 0.01 * sum(ideal.values()) if ideal else 0.0
  for kind, summary in compiled.collectives.items():
    runs = f"({summary.executions} runs)" if summary.executions != summary.count else ""
    done_by = f", {summary.as_all_reduce} as all-reduce" if summary.as_all_reduce else ""
    cell = f"{kind} {summary.count}x{runs}{done_by} {_gb(summary.sent_bytes)}"
    if ideal is not None and ideal.get(kind, 0) > floor:
      cell += f" / {_gb(ideal[kind])} = {summary.sent_bytes / ideal[kind]:.2f}x"
    cells.append(cell + f" ({','.join(summary.axes)})")
  if ideal:
    sent = sum(summary.sent_bytes for summary in compiled.collectives.values())
    cells.append(f"**total {_gb(sent)} / {_gb(sum(ideal.values()))} = "
                 f"{sent / sum(ideal.values()):.2f}x**")
  return "; ".join(cells) or "none"


def report(topology, variant, setup, chip, compiled: aot.Compiled, what: str, batch: int,
           ideal: dict | None = None) -> str:
  """One Markdown table row."""
  mesh = " ".join(f"{a}{n}" for a, n in setup.mesh.shape.items() if n > 1) or "1"
  devices = setup.mesh.devices.flatten()
  hosts = len({d.process_index for d in devices})
  hbm = chip.hbm_bytes
  if not compiled.ok:
    return (f"| {topology} | {len(devices)}/{hosts} | {mesh} | {variant} | {what} | {batch} | "
            f"{batch / len(devices):g} | - | - | - | {compiled.error} | {_gb(hbm)} | no | - | - | "
            f"- | {compiled.seconds:.0f} |")
  flop_time = compiled.flops / chip.bf16_flops
  sent = sum(summary.sent_bytes for summary in compiled.collectives.values())
  comm_time = collective_time(sent, chip)
  times = f"{flop_time * 1e3:.1f} / " + (
      f"{comm_time * 1e3:.1f} / {comm_time / flop_time:.2f}" if comm_time is not None
      and flop_time else "- / -")
  return (f"| {topology} | {len(devices)}/{hosts} | {mesh} | {variant} | {what} | {batch} | "
          f"{batch / len(devices):g} | {_gb(compiled.args)} | {_gb(compiled.outputs)} | "
          f"{_gb(compiled.temps)} | {_gb(compiled.total)} | {_gb(hbm)} | "
          f"{'yes' if compiled.total <= hbm else 'NO'} | {compiled.flops / 1e12:.2f} | "
          f"{times} | {collectives_cell(compiled, ideal)} | {compiled.seconds:.0f} |")


HEADER = ("| slice | chips/hosts | mesh | variant | program | global batch | per chip | "
          "args GB | outputs GB | temps GB | total GB | HBM GB | fits | TFLOP/chip | "
          "est. ms: FLOPs at peak / collectives at ICI / ratio | "
          "collectives: kind, count (runs), GB sent per chip / ideal = ratio (mesh axes) | "
          "compile s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv):
  del argv
  config = FLAGS.config
  print(f"config: model {config.model.name} {config.model.size}/{config.model.patch_size}, "
        f"objective {config.objective.name}, {config.model.compute_dtype}, global batch "
        f"{config.training.batch_size}, mesh data={config.mesh.data} fsdp={config.mesh.fsdp} "
        f"tensor={config.mesh.tensor}; jax {jax.__version__}; compiled by libtpu, no TPU attached")
  print(HEADER, flush=True)
  notes = []
  for topology in FLAGS.topologies:
    generation = hardware.GENERATIONS[topology.partition(":")[0]]
    chip = hardware.SPECS[generation]
    devices = hardware.tpu_slice(topology, FLAGS.num_slices).devices
    notes.append(f"{topology}: {chip.name}, {chip.bf16_flops / 1e12:.0f} TFLOP/s bf16 and "
                 f"{_gb(chip.hbm_bytes)} GB HBM per chip (datasheet, kdiff_jax/hardware.py)")
    for variant in FLAGS.variants:
      vconfig = variant_config(config, variant)
      setup, step = aot.compile_train_step(vconfig, devices)
      print(report(topology, variant, setup, chip, step, "train step", vconfig.training.batch_size,
                   aot.ideal_collectives(setup)), flush=True)
      if FLAGS.hlo_dir and step.ok:
        path = os.path.join(FLAGS.hlo_dir, f"{topology.replace(':', '_')}_{variant}.hlo.txt")
        os.makedirs(FLAGS.hlo_dir, exist_ok=True)
        with open(path, "w") as f:
          f.write(step.hlo)
        notes.append(f"{topology} {variant}: the train step's HLO is in {path}")
      if FLAGS.sampler:
        print(report(topology, variant, setup, chip, aot.compile_sampler(setup), "sampler",
                     vconfig.eval.batch_size), flush=True)
      if variant == FLAGS.variants[0]:
        largest = parallel.replicated_arrays(setup.abstract_state["params"],
                                             setup.state_shardings["params"])[:3]
        notes.append(f"{topology}: largest replicated parameters: " + (", ".join(
            f"{path} {list(shape)} ({n:,})" for path, shape, n in largest) or "none"))
      if FLAGS.largest_batch:
        unit = aot.batch_unit(setup)
        batch = vconfig.training.batch_size
        fit = fits_hbm(step, chip)
        largest_fit, fails = largest_batch(config, variant, devices, chip, unit,
                                           batch if fit else None, None if fit else batch)
        notes.append(f"{topology} {variant}: largest global batch that fits: "
                     f"{largest_fit if largest_fit else 'none tried fits'}"
                     f"{f' (does not fit at {fails})' if fails else ' (upper end not reached)'}; "
                     f"unit {unit}")
  print()
  for note in notes:
    print(note)


def main_one_line_errors(argv):
  """main, with a config or mesh that cannot run said in one line (exit code 2), as main.py does;
  a mesh shape that does not follow a slice's torus is laid out by splitting a physical axis,
  with a line saying so (parallel.make_mesh)."""
  try:
    main(argv)
  except ValueError as error:
    print(f"error: {(str(error).strip().splitlines() or [type(error).__name__])[0]}",
          file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main_one_line_errors)
