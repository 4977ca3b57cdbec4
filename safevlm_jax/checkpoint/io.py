"""Low-level pieces of the checkpoint format: atomic directories, parameter paths, layouts.

A checkpoint's `params/` is an orbax PyTree of nested dicts with string keys; a parameter is
named by its slash path, e.g. `language_model/model/layers/3/self_attn/q_proj/kernel`
(unscanned layout) or `language_model/model/layers/self_attn/q_proj/kernel` with a leading
[num_layers] axis (scanned layout). Readers accept either layout for any request, so a
checkpoint written by a scanned model loads into an unscanned one and back.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint import v1 as ocp

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
_LAYER = re.compile(r"^(.*/layers)/(\d+)/(.*)$")
_STACKED = re.compile(r"^(.*/layers)/([^0-9/][^/]*/.*)$")


# Directories ---------------------------------------------------------------------------------
def local_path(path: str, what: str = "path") -> str:
    """`path` made absolute; a URL (gs://, s3://, ...) is refused with a ValueError. Every
    reader and writer here uses POSIX calls (atomic renames, the data shards), so a bucket
    must be mounted (e.g. gcsfuse at /gcs/BUCKET on every host) and passed by its mount path."""
    if "://" in str(path):
        raise ValueError(f"{what} {path!r} is a URL: mount the bucket (e.g. gcsfuse at /gcs/BUCKET "
                         f"on every host) and pass the mounted path")
    return os.path.abspath(path)


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a fresh temporary directory next to `path`, renamed to `path` on success.

    Refuses an existing `path` unless `overwrite`. On any exception the temporary directory
    is deleted, so a crash never leaves a partial output at `path` (the old one, if any,
    stays untouched until the final rename).

    Multi-process (`jax.process_count() > 1`): every process must enter with the same `path`
    on a filesystem they all share, and all get the same temporary directory
    `.<name>.tmp-shared`. Process 0 alone creates it (replacing a crashed run's), renames or
    deletes it; barriers hold every process until it exists, then until all are done writing,
    and then until the rename, so all see the finished `path` on return. Inside, write either
    collectively (orbax `ocp.save` from every process) or from process 0 only (`is_primary`).
    """
    path = local_path(path, "output directory")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    parent, name = os.path.split(path)
    owner = is_primary()
    if jax.process_count() == 1:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    else:
        tmp = os.path.join(parent, f".{name}.tmp-shared")
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed run
            os.makedirs(tmp)
    _barrier(f"atomic_directory created {path}")
    try:
        yield tmp
    except BaseException:
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier(f"atomic_directory written {path}")
    if owner and os.path.exists(path):
        old = tmp + ".old"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
    elif owner:
        os.rename(tmp, path)
    _barrier(f"atomic_directory renamed {path}")


def _barrier(name: str) -> None:
    """Waits until every JAX process gets here (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
    """True in process 0, the one that writes what all processes share once: a checkpoint's
    metadata, logs and progress, the synthetic training data."""
    return jax.process_index() == 0


# Paths and layouts ---------------------------------------------------------------------------
def path_str(path: Iterable) -> str:
    return "/".join(str(p) for p in path)


def flat_values(state: nnx.State) -> dict[str, Any]:
    """{slash path: array (or ShapeDtypeStruct)} of an nnx State."""
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def nest(flat: Mapping[str, Any]) -> dict:
    """{'a/b': x} -> {'a': {'b': x}} (orbax's tree)."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Inverse of `nest`."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def layer_key(key: str) -> tuple[str, int] | None:
    """'x/layers/3/rest' -> ('x/layers/rest', 3): the scanned key and the layer index."""
    m = _LAYER.match(key)
    return (f"{m.group(1)}/{m.group(3)}", int(m.group(2))) if m else None


def unstacked_shapes(shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """Per-layer view {unscanned key: shape} of {key: shape} in either layout."""
    out = {}
    for key, shape in shapes.items():
        if _STACKED.match(key):
            head, rest = _STACKED.match(key).groups()
            out.update({f"{head}/{i}/{rest}": tuple(shape[1:]) for i in range(shape[0])})
        else:
            out[key] = tuple(shape)
    return out


# Reading -------------------------------------------------------------------------------------
class ParamReader:
    """Reads parameters of `<checkpoint>/params` by unscanned key, whatever the stored layout.

    `shapes`/`dtypes` describe the stored arrays; `locate(key)` gives (stored key, layer index
    or None); `read(stored_keys, shardings)` restores only those arrays.
    """

    def __init__(self, checkpoint_dir: str):
        self.path = os.path.join(local_path(checkpoint_dir, "checkpoint"), PARAMS_DIR)  # orbax needs absolute
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"{checkpoint_dir}: not a checkpoint (no {PARAMS_DIR}/ directory)")
        meta = flatten(ocp.metadata(self.path).metadata)
        self.shapes = {k: tuple(m.shape) for k, m in meta.items()}
        self.dtypes = {k: np.dtype(m.dtype) for k, m in meta.items()}

    def locate(self, key: str) -> tuple[str, int | None]:
        """Stored key and layer index holding unscanned parameter `key` (KeyError if none)."""
        if key in self.shapes:
            return key, None
        split = layer_key(key)
        if split and split[0] in self.shapes and split[1] < self.shapes[split[0]][0]:
            return split
        raise KeyError(f"{self.path}: no parameter {key}")

    def read(self, keys: Iterable[str], shardings: Mapping[str, Any] | None = None,
             dtypes: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
        """Restores stored arrays `keys` (default: on the host CPU device, stored dtype)."""
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        abstract = {k: jax.ShapeDtypeStruct(self.shapes[k], (dtypes or {}).get(k, self.dtypes[k]),
                                            sharding=(shardings or {}).get(k, cpu)) for k in keys}
        if not abstract:
            return {}
        context = ocp.Context()
        context.pytree.loading.partial_load = True
        with context:
            return flatten(ocp.load(self.path, nest(abstract)))


def iter_unscanned(reader: ParamReader, keys: list[str], budget_bytes: int
                   ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (unscanned key, host array) for `keys`, reading stored arrays in batches of at
    most ~`budget_bytes` (one stacked array is read once for all its layers)."""
    located = sorted(((reader.locate(k), k) for k in keys), key=lambda t: (t[0][0], t[0][1] or 0))
    batch: list[tuple[tuple[str, int | None], str]] = []
    size = 0

    def flush():
        arrays = reader.read(sorted({loc[0] for loc, _ in batch}))
        for (stored, index), key in batch:
            a = np.asarray(arrays[stored])
            yield key, a if index is None else a[index]

    for loc, key in located:
        new = not any(loc[0] == b[0][0] for b in batch)
        nbytes = int(np.prod(reader.shapes[loc[0]])) * reader.dtypes[loc[0]].itemsize
        if new and batch and size + nbytes > budget_bytes:
            yield from flush()
            batch, size = [], 0
        batch.append((loc, key))
        size += nbytes if new else 0
    if batch:
        yield from flush()


# Writing in pieces ---------------------------------------------------------------------------
def write_partial(params_dir: str, flat: Mapping[str, Any]) -> None:
    """Adds arrays {key: array} to an unfinished `params_dir` (see `finalize_partial`)."""
    ocp.partial.save(params_dir, nest({k: np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v
                                       for k, v in flat.items()}))


def finalize_partial(params_dir: str) -> None:
    ocp.partial.finalize(params_dir)
