#!/usr/bin/env bash
# Copy this checkout to every worker and install it: launch/tpu_install.sh
# Installs requirements.txt, then the TPU build of jax (same version as requirements.txt).

set -euo pipefail
source "$(dirname "$0")/common.sh"
usage_if_asked "${1:-}"
root="$(cd "$(dirname "$0")/.." && pwd)"
jax_version="$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' "$root/requirements.txt")"
gcloud compute tpus tpu-vm scp --recurse "$root" "$TPU_NAME:~/$PROJECT_DIR" --zone="$ZONE" --worker=all
on_all_workers "cd ~/$PROJECT_DIR && pip install -r requirements.txt 'jax[tpu]==$jax_version'"
