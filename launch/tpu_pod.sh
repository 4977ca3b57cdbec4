#!/usr/bin/env bash
# Runs training on every worker of a TPU VM slice (v4 / v5e / v5p): one process per host,
# `jax.distributed.initialize()` finds the other workers by itself.
#   TPU_NAME=safevlm ZONE=us-east5-a ACCELERATOR=v5p-128 [CREATE=1] [REPO=https://...] \
#     GCS_BUCKET=bucket launch/tpu_pod.sh configs/stage2.py:7b /gcs/bucket/runs/s2 [--config.key=value ...]
# WORKDIR (and every path in the config) must be a POSIX path all workers see: GCS_BUCKET=b
# mounts gs://b at /gcs/b on every worker with gcsfuse (which the workers must have) first.
# CREATE=1 creates the slice first.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: TPU_NAME=... ZONE=... [GCS_BUCKET=b] $0 CONFIG_FILE.py:PRESET /gcs/b/WORKDIR [--config.key=value ...]" >&2
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
mount=""
if [[ -n "${GCS_BUCKET:-}" ]]; then
  b=$(printf %q "$GCS_BUCKET")
  mount="sudo mkdir -p /gcs/$b && sudo chmod 777 /gcs/$b
mountpoint -q /gcs/$b || gcsfuse --implicit-dirs $b /gcs/$b
"
fi
remote="set -euo pipefail
${mount}if [[ ! -d safevlm_jax ]]; then git clone --branch $(printf %q "$BRANCH") $(printf %q "$REPO") safevlm_jax; fi
cd safevlm_jax && git pull --ff-only
python3 -m pip install -q -U pip && python3 -m pip install -q -e '.[tpu]'
python3 -m safevlm_jax.train --config $(printf %q "$config") --workdir $(printf %q "$workdir")${extra}"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$remote"
