#!/usr/bin/env bash
# Run one config on every worker: launch/tpu_run.sh CONFIG WORKDIR [main.py flags...]
# e.g. launch/tpu_run.sh configs/imm_in256.py gs://my-bucket/imm_in256 --config.training.num_steps=1000
# The job runs in the background on each worker (output in ~/PROJECT_DIR/LOG_FILE); JAX finds
# the other workers itself. Running it again resumes from the latest checkpoint in WORKDIR.

set -euo pipefail
source "$(dirname "$0")/common.sh"
usage_if_asked "${1:-}"
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [main.py flags...]" >&2
  exit 2
fi
config="$1" workdir="$2"
shift 2
extra="$(printf ' %q' "$@")"
on_all_workers "cd ~/$PROJECT_DIR && nohup python main.py --config=$config --workdir=$workdir$extra > $LOG_FILE 2>&1 &"
