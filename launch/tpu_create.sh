#!/usr/bin/env bash
# Create a TPU VM or pod slice: launch/tpu_create.sh [--spot]
# Uses TPU_NAME, ZONE, ACCELERATOR_TYPE (e.g. v4-8, v5litepod-16), TPU_VERSION from launch/common.sh.

set -euo pipefail
source "$(dirname "$0")/common.sh"
usage_if_asked "${1:-}"
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
  --accelerator-type="$ACCELERATOR_TYPE" --version="$TPU_VERSION" "$@"
