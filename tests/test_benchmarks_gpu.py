"""The GPU benchmarks on the CPU: benchmarks/gpu_suite.sh --dry_run runs its tables end to end at
tiny sizes (DiT-T/2, 8x8, batch 8) with TensorFlow, TFDS and clu unimportable; the analytic model
FLOPs agree with XLA's count of the compiled step; the largest-batch search finds the largest
batch that fits. (shellcheck and -h of the script: tests/test_launch.py.)"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(path):
  """{column: cell} of each data row of the Markdown table in `path`."""
  with open(path) as f:
    lines = [line.strip() for line in f if line.startswith("|")]
  header = [cell.strip() for cell in lines[0].strip("|").split("|")]
  return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_dry_run_writes_the_tables(tmp_path):
  out = tmp_path / "suite"
  env = dict(os.environ, PYTHON=sys.executable)
  result = subprocess.run(
      ["bash", "benchmarks/gpu_suite.sh", "--dry_run", f"--out_dir={out}",
       "--phases=jax_objectives,torch_flow_xl", "--unrolled"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = (out / "SUMMARY.md").read_text()
  assert "phases: jax_objectives,torch_flow_xl" in summary and "Not run" not in summary, summary

  jax_rows = {row["objective"]: row for row in _rows(out / "jax_objectives.md")}
  assert set(jax_rows) == {"flow", "imm"}, jax_rows
  for name, row in jax_rows.items():
    assert float(row["images/s"]) > 0, row
    # XLA counts every op of the compiled step (elementwise, optimizer, EMA); the analytic
    # k·forward_macs counts the matmuls: close, and XLA's a little above. (Unrolled blocks: XLA
    # counts a scan's body once.)
    ratio = float(row["XLA GFLOP/img"]) / float(row["model GFLOP/img"])
    assert 1.0 <= ratio < 1.5, (name, ratio)
  assert float(jax_rows["flow"]["step / flow step (per image)"]) == 1.0

  (torch_row,) = _rows(out / "torch_flow_xl.md")
  assert float(torch_row["images/s"]) > 0, torch_row
  assert torch_row["model GFLOP/img"] == jax_rows["flow"]["model GFLOP/img"]
  assert re.search(r"autocast bf16=False, compile=False, sdpa=math, fused AdamW=False",
                   (out / "torch_flow_xl.md").read_text())


@pytest.fixture(scope="module")
def step_time():
  spec = importlib.util.spec_from_file_location(
      "benchmarks_step_time", os.path.join(ROOT, "benchmarks", "step_time.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("threshold, unit, start", [
    (1, 1, 16), (3, 4, 16), (5, 4, 16), (17, 1, 16), (100, 4, 8), (1000, 8, 64), (4097, 4, 4096)])
def test_largest_batch_search(step_time, threshold, unit, start):
  probed = []

  def fits(batch):
    probed.append(batch)
    return batch <= threshold

  batch, probes = step_time.bisect(fits, start, unit, tolerance=1.15)
  largest = threshold // unit * unit   # the answer, in closed form
  assert probes == len(probed) and all(b % unit == 0 for b in probed)
  if largest == 0:
    assert batch == 0
  else:
    assert batch % unit == 0 and fits(batch) and batch <= largest < 1.15 * batch + unit
