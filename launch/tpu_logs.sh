#!/usr/bin/env bash
# Follow the log of one worker (default 0, which writes metrics): launch/tpu_logs.sh [WORKER]

set -euo pipefail
source "$(dirname "$0")/common.sh"
usage_if_asked "${1:-}"
worker="${1:-0}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="$worker" \
  --command="tail -n 100 -f ~/$PROJECT_DIR/$LOG_FILE"
