#!/usr/bin/env bash
# Run a config on one machine with several NVIDIA GPUs: launch/gpu_run.sh CONFIG WORKDIR [flags...]
# One process drives every visible GPU (select with CUDA_VISIBLE_DEVICES); install once with
# INSTALL=1 (requirements.txt, then the CUDA 12 build of jax of the same version).

set -euo pipefail
source "$(dirname "$0")/common.sh"
usage_if_asked "${1:-}"
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [main.py flags...]" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if [[ "${INSTALL:-0}" == "1" ]]; then
  jax_version="$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' requirements.txt)"
  pip install -r requirements.txt "jax[cuda12]==$jax_version"
fi
config="$1" workdir="$2"
shift 2
XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}" \
  exec python main.py --config="$config" --workdir="$workdir" "$@"
