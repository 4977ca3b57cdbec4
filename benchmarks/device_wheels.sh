#!/usr/bin/env bash
# Downloads, into .whl/ (ignored by git), the wheels of the project's dependencies that the GPU
# machine's image lacks, for its Python 3.12 on x86-64 Linux. `benchmarks/device_check.sh`
# installs them there with --no-index --no-deps. Run here, with network, before a device call
# that carries `.whl`:
#
#   bash benchmarks/device_wheels.sh            # ~9 MiB; the call's carry: [".whl"]
#
# The image already has jax, flax, optax, orbax, transformers, torch, peft, numpy, absl-py,
# etils, protobuf, pyarrow, psutil, requests, wrapt, PyYAML, six, cloudpickle, zipp, fsspec,
# typing_extensions (the device README's package list). What it lacks is the list below: the
# pinned dependencies of pyproject.toml and their own requirements (--no-deps: each is named).
# Versions are those of this project's virtualenv, where the tests pass.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
PACKAGES=(
  ml_collections==1.1.0        # configs/
  grain==0.2.18                # safevlm_jax/data, train
  portpicker==1.6.0            # grain
  array_record==0.8.6          # grain, tensorflow-datasets
  tensorflow-datasets==4.9.10  # safevlm_jax/data (dataset builder)
  importlib_resources==7.1.0   # tensorflow-datasets imports it undeclared; etils[epath]
  dm-tree==0.1.10              # tensorflow-datasets
  immutabledict==4.3.1
  simple-parsing==0.1.9
  docstring_parser==0.18.0     # simple-parsing
  tensorflow-metadata==1.21.0
  googleapis-common-protos==1.76.0  # tensorflow-metadata
  termcolor==3.3.0
  toml==0.10.2
  tensorboardX==2.6.5          # safevlm_jax/train metrics
)
SDIST_ONLY=(promise==2.3)      # tensorflow-datasets; no wheel on PyPI: built here (pure Python)

mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${PACKAGES[@]}" 2> >(grep -v "is ignored: it is neither" >&2)  # this host's pip.conf
python3 -m pip wheel -q --no-deps -w "$dest" "${SDIST_ONLY[@]}"
grep -qxF "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >>.git/info/exclude
du -sh "$dest"
ls "$dest"
