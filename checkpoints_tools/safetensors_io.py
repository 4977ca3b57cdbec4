"""Streaming safetensors: read an HF weights directory tensor by tensor, write one likewise.

Reading parses each file's header and reads a tensor's bytes with plain file reads, straight
into the array it returns, one tensor at a time: nothing is memory-mapped, so the process holds
only the arrays it keeps (`safe_open`'s mapping counted every page it had read in the RSS, a
whole 5 GB shard by its end). Every file is checked up front (with `safe_open`): a missing shard
named by `model.safetensors.index.json`, a truncated or corrupt file, a key the index
places in a shard that does not hold it, or a key present in two files is an error naming
the file and the key.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                "BOOL": np.bool_}


def _open(path: str):
    try:
        return safe_open(path, framework="np")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); truncated or "
                         f"still downloading?") from e


class SafetensorsDir:
    """The tensors of `directory`: sharded (with INDEX_FILE) or a single model.safetensors.

    `files`: {file name: [keys]} in file order; `shapes` / `dtypes`: {key: ...} read from the
    headers only.
    """

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
            absent = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
            if absent:
                keys = {n: sorted(k for k, v in weight_map.items() if v == n)[:3] for n in absent}
                raise FileNotFoundError(f"{index}: shard(s) missing from {directory}: {absent} "
                                        f"(holding e.g. {keys})")
        elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
            weight_map, names = None, [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE}")
        self.files: dict[str, list[str]] = {}
        self._where: dict[str, tuple[str, int, int]] = {}  # key -> (path, first byte, end)
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        for name in names:
            path = os.path.join(directory, name)
            with _open(path) as f:
                keys = list(f.keys())
                for key in keys:
                    if key in self.shapes:
                        raise ValueError(f"{path}: key {key} also in {self.file_of(key)}")
                    sl = f.get_slice(key)
                    self.shapes[key], self.dtypes[key] = tuple(sl.get_shape()), sl.get_dtype()
            self._where.update({k: (path, *span) for k, span in _data_spans(path).items()})
            self.files[name] = keys
        if weight_map is not None:
            wrong = sorted(k for k, n in weight_map.items() if k not in self.files[n])
            if wrong:
                raise ValueError(f"{index}: keys not found in the shard it names: "
                                 f"{[(k, weight_map[k]) for k in wrong]}")

    def file_of(self, key: str) -> str:
        return next(n for n, keys in self.files.items() if key in keys)

    def tensor(self, key: str) -> np.ndarray:
        """The array `key`, read from its file into fresh memory (KeyError if absent)."""
        path, begin, end = self._where[key]
        if self.dtypes[key] not in NUMPY_DTYPES:
            raise ValueError(f"{path}: tensor {key} has dtype {self.dtypes[key]}, not one of "
                             f"{sorted(NUMPY_DTYPES)}")
        out = np.empty(self.shapes[key], NUMPY_DTYPES[self.dtypes[key]])
        if out.nbytes != end - begin:
            raise ValueError(f"{path}: tensor {key} holds {end - begin} bytes, its shape and dtype "
                             f"{list(out.shape)} {self.dtypes[key]} need {out.nbytes}")
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        with open(path, "rb", buffering=0) as f:
            while done < out.nbytes:
                n = os.preadv(f.fileno(), [view[done:]], begin + done)
                if n == 0:
                    raise ValueError(f"{path}: ends inside tensor {key} (truncated?)")
                done += n
        return out

    def iter_shards(self) -> Iterator[tuple[str, Iterator[tuple[str, np.ndarray]]]]:
        """Yields (file path, iterator of (key, array)) per file; each array is read when the
        iterator reaches it."""
        for name, keys in self.files.items():
            yield os.path.join(self.directory, name), ((k, self.tensor(k)) for k in keys)


def _data_spans(path: str) -> dict[str, tuple[int, int]]:
    """{key: (first byte, end)} of each tensor's data in safetensors file `path` (its header:
    8 bytes of little-endian length, then JSON with data offsets relative to its end)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: (8 + size + v["data_offsets"][0], 8 + size + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '100KB' / int -> bytes (HF's decimal units)."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, factor in units.items():
        if size.upper().endswith(unit):
            return int(float(size[:-len(unit)]) * factor)
    return int(size)


SAFETENSORS_NAMES = {np.dtype(v): k for k, v in NUMPY_DTYPES.items()}
HEADER_RESERVE = 256 << 10  # header bytes reserved at the start of each file (~1,500 tensors)


class ShardWriter:
    """Writes {key: array} to `directory` in files of at most `max_shard_size` bytes (a single
    bigger tensor gets its own file; a file also ends once its header would outgrow
    HEADER_RESERVE), then `close()` names them HF-style and writes the index.

    Each array goes to disk as it is added, after HEADER_RESERVE bytes kept for the file's
    header, which is written when the file ends and padded with spaces up to the data (as the
    safetensors format allows): nothing is held in memory, where a whole 5 GB shard was."""

    def __init__(self, directory: str, max_shard_size: int | str = "5GB", prefix: str = "model"):
        self.directory, self.prefix = directory, prefix
        self.limit = parse_size(max_shard_size)
        self.file = None
        self.header: dict[str, dict] = {}  # the open file's entries
        self.size = 0  # data bytes in the open file
        self.header_bytes = 0  # an upper bound of its JSON header's length
        self.written: list[tuple[str, list[str], int]] = []
        self.keys: set[str] = set()

    def add(self, key: str, array: np.ndarray) -> None:
        if key in self.keys:
            raise ValueError(f"{self.directory}: tensor {key} written twice")
        array = np.ascontiguousarray(array)
        if array.dtype not in SAFETENSORS_NAMES:
            raise ValueError(f"{self.directory}: tensor {key} has dtype {array.dtype}, not one of "
                             f"{sorted(map(str, SAFETENSORS_NAMES))}")
        entry = {"dtype": SAFETENSORS_NAMES[array.dtype], "shape": list(array.shape)}
        entry_bytes = len(json.dumps({key: {**entry, "data_offsets": [2**63, 2**63]}}))
        if self.file is not None and (self.size + array.nbytes > self.limit or
                                      self.header_bytes + entry_bytes > HEADER_RESERVE - 64):
            self._finish()
        if self.file is None:
            name = f"{self.prefix}-part-{len(self.written):05d}.safetensors"
            self.file = open(os.path.join(self.directory, name), "wb")
            self.file.seek(8 + HEADER_RESERVE)
        self.header[key] = {**entry, "data_offsets": [self.size, self.size + array.nbytes]}
        self.file.write(memoryview(array.reshape(-1).view(np.uint8)))
        self.size += array.nbytes
        self.header_bytes += entry_bytes
        self.keys.add(key)

    def _finish(self) -> None:
        raw = json.dumps({"__metadata__": {"format": "pt"}, **self.header}).encode()
        self.file.seek(0)
        self.file.write(HEADER_RESERVE.to_bytes(8, "little") + raw.ljust(HEADER_RESERVE, b" "))
        self.file.close()
        self.written.append((os.path.basename(self.file.name), list(self.header), self.size))
        self.file, self.header, self.size, self.header_bytes = None, {}, 0, 0

    def close(self) -> list[str]:
        """Finishes the files; returns their names."""
        if self.file is None and not self.written:  # no tensors: still one (empty) file
            self.file = open(os.path.join(self.directory, f"{self.prefix}-part-00000.safetensors"), "wb")
        if self.file is not None:
            self._finish()
        n = len(self.written)
        if n == 1:
            os.rename(os.path.join(self.directory, self.written[0][0]),
                      os.path.join(self.directory, f"{self.prefix}.safetensors"))
            return [f"{self.prefix}.safetensors"]
        weight_map, total, names = {}, 0, []
        for i, (tmp, keys, size) in enumerate(self.written):
            name = f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.directory, tmp), os.path.join(self.directory, name))
            weight_map.update(dict.fromkeys(keys, name))
            total += size
            names.append(name)
        with open(os.path.join(self.directory, f"{self.prefix}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                      f, indent=2)
        return names


def save_tensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """One small safetensors file (safety modules, LoRA adapter)."""
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})
