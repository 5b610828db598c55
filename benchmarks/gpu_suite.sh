#!/usr/bin/env bash
# The step-time / MFU sweep of one GPU in one command, within a time budget (default 8 minutes):
# benchmarks/step_time.py (our train step) and benchmarks/torch_step_time.py (the torch DiT twin
# as a PyTorch user runs it), each table written as Markdown into OUT_DIR, all of them with the
# device, versions, commit and date in OUT_DIR/SUMMARY.md.
#
#   bash benchmarks/gpu_suite.sh [--out_dir DIR] [--budget_s 450] [--phases a,b] [--unrolled]
#                                [--dry_run]
#
# The phases, most important first; a phase that would start past the budget is skipped, and a
# running one is stopped when the budget ends (its rows so far stay; SUMMARY.md says which):
#   jax_objectives     DiT-XL/2, bf16, batch 256: flow matching, then IMM (M = 4), MeanFlow and
#                      TVM (those registered), each against flow matching's step
#   torch_flow_xl      the same flow-matching step in PyTorch
#   jax_attention      flow matching with model.attention xla, then cudnn
#   jax_sizes          DiT-B/2 and L/2, flow matching
#   torch_sizes        the same in PyTorch
#   jax_largest_batch  the largest batch that fits, without and with remat (flow matching, XL/2)
# All at 32x32x4 (SD-VAE latents), float32 master weights; the JAX phases with
# model.scan_blocks=true (compile time independent of depth, so the budget holds; --unrolled
# times the unrolled blocks instead). --phases runs only the named phases.
#
# --dry_run: the same phases at tiny sizes (DiT-T/2, 8x8, batch 8, two steps) on one CPU device,
# compiles shared through a compilation cache in OUT_DIR/.xla_cache, PyTorch without autocast,
# torch.compile, flash attention or fused AdamW, no largest-batch search.
#
# The GPU stack this runs on has jax, flax, optax, orbax, einops and torch but no network and no
# TensorFlow, TFDS, clu or ml_collections. The pure-Python wheels the project needs beyond that
# travel in the git-ignored folder wheels/, filled beforehand on a machine with pip access:
#   python -m pip download --no-deps --only-binary=:all: -d wheels ml_collections==1.1.0 absl-py==2.5.1
# A missing one is installed from there (pip --no-index --find-links wheels, into a private
# folder put on PYTHONPATH). Every phase runs with tensorflow, tensorflow_datasets and clu made
# unimportable, so a dependency on them fails here rather than on a box without them.
#
# Environment: PYTHON (default python3), XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.9).

set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  exit 0
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
out_dir="$root/benchmarks/gpu_suite_out"
budget_s=450   # the phases' share of 8 minutes: installing and the summary take the rest
dry_run=0
phases=all
scan=(--scan_blocks)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out_dir) out_dir="$2"; shift 2 ;;
    --out_dir=*) out_dir="${1#*=}"; shift ;;
    --budget_s) budget_s="$2"; shift 2 ;;
    --budget_s=*) budget_s="${1#*=}"; shift ;;
    --phases) phases="$2"; shift 2 ;;
    --phases=*) phases="${1#*=}"; shift ;;
    --unrolled) scan=(--noscan_blocks); shift ;;
    --dry_run) dry_run=1; shift ;;
    *) echo "error: unknown argument '$1' (see $0 -h)" >&2; exit 2 ;;
  esac
done
known_phases=",jax_objectives,torch_flow_xl,jax_attention,jax_sizes,torch_sizes,jax_largest_batch,"
if [[ $phases != all ]]; then
  IFS=, read -r -a wanted <<< "$phases"
  for name in "${wanted[@]}"; do
    if [[ $known_phases != *",$name,"* ]]; then
      echo "error: --phases: unknown phase '$name'; known: ${known_phases:1:${#known_phases}-2}" >&2
      exit 2
    fi
  done
fi
python="${PYTHON:-python3}"
cd "$root"
mkdir -p "$out_dir"
start_s=$SECONDS
summary="$out_dir/SUMMARY.md"

# --- packages: what the stack lacks, from wheels/ --------------------------------------------
missing=()
for pair in ml_collections:ml_collections absl:absl-py; do
  module="${pair%%:*}" package="${pair#*:}"
  if ! "$python" -c "import $module" 2>/dev/null; then
    missing+=("$package")
  fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
  if [[ ! -d "$root/wheels" ]]; then
    echo "error: ${missing[*]} missing and no wheels/ folder; fill it first (see $0 -h)" >&2
    exit 1
  fi
  site="${TMPDIR:-/tmp}/kdiff_jax_suite_site"
  "$python" -m pip install -q --no-index --no-deps --upgrade --find-links "$root/wheels" \
    --target "$site" "${missing[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

# Runs a script with tensorflow, tensorflow_datasets and clu unimportable (as if not installed).
launcher="$(mktemp "${TMPDIR:-/tmp}/kdiff_jax_suite.XXXXXX")"
trap 'rm -f "$launcher"' EXIT
cat > "$launcher" <<'PY'
import importlib.machinery, runpy, sys
ABSENT = ("tensorflow", "tensorflow_datasets", "clu")

class Absent(importlib.machinery.PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    return None if name.split(".")[0] in ABSENT else super().find_spec(name, path, target)

sys.meta_path = [Absent if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
PY

# --- the sweep -------------------------------------------------------------------------------
if [[ $dry_run == 1 ]]; then
  # One CPU device, and the phases that compile the same step share a compilation cache.
  export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=1"
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$out_dir/.xla_cache}"
  common=(--image_size=8 --steps=2 --warmup=1)
  jax_common=("${common[@]}" "${scan[@]}" --compute_dtypes=float32 --compilation_cache)
  torch_common=("${common[@]}" --device=cpu --noautocast --nocompile --sdpa=math --nofused_adamw)
  big=T batch=8 small=T objectives=flow,imm attentions=xla
else
  jax_common=(--image_size=32 --channels=4 "${scan[@]}" --compute_dtypes=bfloat16 --steps=10
              --warmup=2)
  torch_common=(--image_size=32 --channels=4 --steps=10 --warmup=3)
  big=XL batch=256 small=B,L objectives=flow,imm,meanflow,tvm attentions=xla,cudnn
fi

skipped=() tables=()
phase() {  # phase NAME SCRIPT ARGS...: one table into OUT_DIR/NAME.md, within the budget
  local name="$1" script="$2"
  shift 2
  local left=$((budget_s - (SECONDS - start_s))) status=0
  if [[ $phases != all && ",$phases," != *",$name,"* ]]; then
    return 0
  fi
  if [[ $left -le 10 ]]; then
    skipped+=("$name (no time left)")
    return 0
  fi
  echo "== $name (${left} s left)"
  rm -f "$out_dir/$name.md"
  timeout --kill-after=10 "$left" "$python" "$launcher" "$script" "$@" \
    --output="$out_dir/$name.md" || status=$?
  [[ -f "$out_dir/$name.md" ]] && tables+=("$out_dir/$name.md")
  if [[ $status -eq 124 || $status -eq 137 ]]; then
    skipped+=("$name (stopped at the budget)")
  elif [[ $status -ne 0 ]]; then
    skipped+=("$name (exit $status)")
  fi
}

phase jax_objectives benchmarks/step_time.py "${jax_common[@]}" --sizes="$big" \
  --batch_sizes="$batch" --objectives="$objectives"
phase torch_flow_xl benchmarks/torch_step_time.py "${torch_common[@]}" --sizes="$big" \
  --batch_sizes="$batch"
phase jax_attention benchmarks/step_time.py "${jax_common[@]}" --sizes="$big" \
  --batch_sizes="$batch" --objectives=flow --attentions="$attentions"
phase jax_sizes benchmarks/step_time.py "${jax_common[@]}" --sizes="$small" \
  --batch_sizes="$batch" --objectives=flow
phase torch_sizes benchmarks/torch_step_time.py "${torch_common[@]}" --sizes="$small" \
  --batch_sizes="$batch"
if [[ $dry_run == 1 ]]; then
  [[ $phases == all ]] && skipped+=("jax_largest_batch (--dry_run: each probe is a compile)")
else
  phase jax_largest_batch benchmarks/step_time.py "${jax_common[@]}" --sizes="$big" \
    --batch_sizes=128 --objectives=flow --remats=none,full --largest_batch --bisect_tolerance=1.3
fi

# --- the summary -----------------------------------------------------------------------------
{
  echo "# GPU suite$([[ $dry_run == 1 ]] && echo ' (--dry_run, CPU, tiny sizes)')"
  echo
  echo "date $(date -u +%Y-%m-%dT%H:%MZ); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown);" \
    "$("$python" -c 'import jax; print("jax", jax.__version__)' 2>/dev/null || echo 'jax ?');" \
    "$("$python" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || echo 'torch ?');" \
    "$((SECONDS - start_s)) s of a ${budget_s} s budget; phases: $phases"
  if [[ $dry_run == 0 ]] && command -v nvidia-smi >/dev/null; then
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  fi
  for table in "${tables[@]}"; do
    echo
    echo "## $(basename "$table" .md)"
    echo
    cat "$table"
  done
  if [[ ${#skipped[@]} -gt 0 ]]; then
    echo
    echo "Not run or cut short: ${skipped[*]}"
  fi
} > "$summary"
echo "tables in $out_dir; summary $summary"
