#!/usr/bin/env bash
# Stop the run on every worker: launch/tpu_stop.sh [--delete]
# Sends SIGTERM, so every process saves a checkpoint at an agreed step and exits; --delete then
# deletes the TPU VM.

set -euo pipefail
source "$(dirname "$0")/common.sh"
usage_if_asked "${1:-}"
on_all_workers "pkill -TERM -f 'python main.py' || true"
if [[ "${1:-}" == "--delete" ]]; then
  gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
fi
