#!/usr/bin/env bash
# Copy this checkout to every worker and install it: launch/tpu_install.sh
# Installs requirements.txt, then requirements-tpu.txt (libtpu for the pinned jax).

set -euo pipefail
source "$(dirname "$0")/common.sh"
usage_if_asked "${1:-}"
root="$(cd "$(dirname "$0")/.." && pwd)"
gcloud compute tpus tpu-vm scp --recurse "$root" "$TPU_NAME:~/$PROJECT_DIR" --zone="$ZONE" --worker=all
on_all_workers "cd ~/$PROJECT_DIR && pip install -r requirements.txt -r requirements-tpu.txt"
