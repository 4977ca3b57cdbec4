#!/usr/bin/env bash
# One host, all its devices (CPU, one GPU box or a single TPU VM).
#   launch/local.sh configs/stage1.py:tiny /tmp/s1 [--config.key=value ...]
# NUM_CPU_DEVICES=8 fakes 8 CPU devices (to try meshes on a laptop).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG_FILE.py:PRESET WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
cd "$(dirname "$0")/.."
if [[ -n "${NUM_CPU_DEVICES:-}" ]]; then
  export XLA_FLAGS="--xla_force_host_platform_device_count=${NUM_CPU_DEVICES} ${XLA_FLAGS:-}"
fi
exec "${PYTHON:-python}" -m safevlm_jax.train --config "$config" --workdir "$workdir" "$@"
