#!/usr/bin/env bash
# Settings shared by the launch scripts; override any of them in the environment.
# shellcheck disable=SC2034  # used by the scripts that source this file
TPU_NAME="${TPU_NAME:-kdiff-jax}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
PROJECT_DIR="${PROJECT_DIR:-kdiff_jax}"   # checkout directory on every worker
LOG_FILE="${LOG_FILE:-kdiff_jax.log}"     # under PROJECT_DIR on every worker

# Run a command on every worker of the TPU VM (or pod slice).
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

usage_if_asked() {  # print the calling script's header comment for -h / --help
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
    exit 0
  fi
}
