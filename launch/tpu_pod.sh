#!/usr/bin/env bash
# Runs training on every worker of a TPU VM slice (v4 / v5e / v5p): one process per host,
# `jax.distributed.initialize()` finds the other workers by itself.
#   TPU_NAME=safevlm ZONE=us-east5-a ACCELERATOR=v5p-128 [CREATE=1] [REPO=https://...] \
#     launch/tpu_pod.sh configs/stage2.py:7b gs://bucket/runs/s2 [--config.key=value ...]
# WORKDIR must be visible to every worker (a gs:// bucket). CREATE=1 creates the slice first.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: TPU_NAME=... ZONE=... $0 CONFIG_FILE.py:PRESET gs://WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5p-128}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
REPO=${REPO:-https://github.com/safevlm/safevlm_jax.git}
BRANCH=${BRANCH:-main}
config=$1
workdir=$2
shift 2

if [[ "${CREATE:-0}" == 1 ]]; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
fi

extra=$(printf ' %q' "$@")
remote="set -euo pipefail
if [[ ! -d safevlm_jax ]]; then git clone --branch $(printf %q "$BRANCH") $(printf %q "$REPO") safevlm_jax; fi
cd safevlm_jax && git pull --ff-only
python3 -m pip install -q -U pip && python3 -m pip install -q -e . 'jax[tpu]'
python3 -m safevlm_jax.train --config $(printf %q "$config") --workdir $(printf %q "$workdir")${extra}"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$remote"
