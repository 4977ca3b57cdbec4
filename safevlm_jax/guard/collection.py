"""Scan an image collection with SafeVLM's safety head alone (guard mode): the library
behind `python -m safevlm_jax.scan` (see that module for the command line and its outputs).

Re-running skips every path already in verdicts.jsonl or skipped.jsonl. With several
processes (`jax.distributed.initialize`), process p of n scores items p, p+n, ... of the
sorted list on its local devices, writing `OUT/parts/*-p-of-n.jsonl`; process 0 merges them
into verdicts.jsonl and skipped.jsonl and writes the report (`guard.report`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import os
import sys
from typing import Callable, Iterator, Sequence

import numpy as np

from safevlm_jax.data.errors import BadRecord
from safevlm_jax.data.images import ImageConfig, load_pixel_values
from safevlm_jax.safety.policy import RiskPolicy

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VERDICTS, SKIPPED, PARTS = "verdicts.jsonl", "skipped.jsonl", "parts"


@dataclasses.dataclass(frozen=True)
class Source:
    """An image collection: sorted keys and a reader of one key's encoded bytes."""

    description: str
    keys: list[str]
    read: Callable[[str], bytes]


def open_source(images: str) -> Source:
    """A folder tree, a TFDS dataset directory (has dataset_info.json) or a glob."""
    if os.path.isfile(os.path.join(images, "dataset_info.json")):
        return _tfds_source(images)
    if os.path.isdir(images):
        keys = [os.path.join(root, name) for root, _, names in os.walk(images) for name in names
                if name.lower().endswith(IMAGE_EXTENSIONS)]
        return Source(f"folder {images}", sorted(keys), _read_file)
    keys = [p for p in glob.glob(images, recursive=True) if os.path.isfile(p)]
    if not keys:
        raise ValueError(f"--images {images!r}: not a folder, a TFDS dataset directory, or a glob "
                         f"matching any file")
    return Source(f"glob {images}", sorted(keys), _read_file)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _tfds_source(directory: str) -> Source:
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(directory)
    splits = {name: builder.as_data_source(split=name) for name in sorted(builder.info.splits)}
    keys = [f"{name}[{i}]" for name, src in splits.items() for i in range(len(src))]

    def read(key: str) -> bytes:
        name, index = key[:-1].split("[")
        return bytes(splits[name][int(index)]["image"])

    return Source(f"TFDS dataset {directory}", keys, read)


def done_paths(out: str) -> set[str]:
    """Paths already scored or skipped in `out` (merged files and any per-process parts)."""
    files = [os.path.join(out, VERDICTS), os.path.join(out, SKIPPED)]
    if os.path.isdir(os.path.join(out, PARTS)):
        files += sorted(glob.glob(os.path.join(out, PARTS, "*.jsonl")))
    return {row["path"] for f in files for row in read_jsonl(f)}


def read_jsonl(path: str) -> Iterator[dict]:
    """The complete lines of a JSONL file (a torn last line from a crash is ignored)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                yield json.loads(line)


def open_append(path: str):
    """Opens a JSONL file for appending, first cutting a torn last line (crash mid-write)."""
    if os.path.isfile(path):
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def load_batches(source: Source, keys: Sequence[str], batch_size: int, images: ImageConfig,
                 workers: int) -> Iterator[tuple[list[str], list[np.ndarray | BadRecord]]]:
    """Yields (keys, pixel_values [S, S, 3] or the BadRecord why not) per batch, decoding the
    next batch on `workers` threads while the caller scores this one."""

    def load(key: str) -> np.ndarray | BadRecord:
        try:
            return load_pixel_values(source.read(key), images)
        except BadRecord as e:
            return e
        except OSError as e:
            return BadRecord("missing_image", f"cannot read {key}: {e.strerror or e}")

    chunks = [list(keys[i:i + batch_size]) for i in range(0, len(keys), batch_size)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = [pool.map(load, c) for c in chunks[:1]]
        for i, chunk in enumerate(chunks):
            if i + 1 < len(chunks):
                pending.append(pool.map(load, chunks[i + 1]))
            yield chunk, list(pending.pop(0))


def verdict_rows(keys: Sequence[str], level_probs: np.ndarray, type_probs: np.ndarray,
                 policy: RiskPolicy) -> list[dict]:
    """One verdicts.jsonl object per key from probabilities [B, 4], [B, 7]."""
    rows = []
    for key, lp, tp in zip(keys, level_probs, type_probs):
        v = policy.decide(lp, tp)
        rows.append({"path": key, "risk_level": v.risk_level, "risk_type": v.risk_type,
                     "risk_type_name": None if v.risk_type is None else v.risk_type_name,
                     "risk_level_probs": [round(float(p), 6) for p in lp],
                     "risk_type_probs": [round(float(p), 6) for p in tp], "action": v.action})
    return rows


def scan_keys(guard, source: Source, keys: Sequence[str], images: ImageConfig, policy: RiskPolicy,
              verdicts_path: str, skipped_path: str, *, batch_size: int, progress: bool = True,
              workers: int | None = None) -> tuple[int, int]:
    """Scores `keys`, appending to the two JSONL files after every batch; returns
    (scored, skipped)."""
    from tqdm import tqdm

    scored = skipped = 0
    workers = workers or min(32, os.cpu_count() or 1)
    bar = tqdm(total=len(keys), desc="scan", unit="img", disable=not progress, file=sys.stderr)
    with open_append(verdicts_path) as out, open_append(skipped_path) as bad:
        for chunk, loaded in load_batches(source, keys, batch_size, images, workers):
            good = [(k, x) for k, x in zip(chunk, loaded) if isinstance(x, np.ndarray)]
            for k, x in zip(chunk, loaded):
                if isinstance(x, BadRecord):
                    bad.write(json.dumps({"path": k, "reason": x.reason, "detail": x.detail}) + "\n")
            if good:
                level, kind = guard(np.stack([x for _, x in good]), pad_to=batch_size)
                for row in verdict_rows([k for k, _ in good], level, kind, policy):
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush(), bad.flush()
            scored, skipped = scored + len(good), skipped + len(chunk) - len(good)
            bar.update(len(chunk))
            bar.set_postfix(skipped=skipped)
    bar.close()
    return scored, skipped


def merge_parts(out: str) -> None:
    """Appends every per-process part to verdicts.jsonl / skipped.jsonl (once per path), then
    removes the parts."""
    parts = os.path.join(out, PARTS)
    for name in (VERDICTS, SKIPPED):
        target = os.path.join(out, name)
        seen = {row["path"] for row in read_jsonl(target)}
        files = sorted(glob.glob(os.path.join(parts, name.replace(".jsonl", "-*.jsonl"))))
        with open_append(target) as f:
            for row in (r for p in files for r in read_jsonl(p)):
                if row["path"] not in seen:
                    seen.add(row["path"])
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        for p in files:
            os.remove(p)


def scan(checkpoint: str, images: str, out: str, *, batch_size: int = 64,
         policy: RiskPolicy = RiskPolicy(), blur: bool = True, progress: bool = True, mesh=None) -> dict:
    """Scans `images` into `out` (see the module docstring) on this process's devices (data
    parallel; or `mesh`, sharded by the "inference" rules) and slice; returns this process's
    counts {"total", "already_done", "scored", "skipped"}."""
    import jax

    from safevlm_jax.checkpoint.assets import image_config
    from safevlm_jax.guard import report as scan_report
    from safevlm_jax.guard.model import Guard

    index, count = jax.process_index(), jax.process_count()
    source = open_source(images)
    os.makedirs(os.path.join(out, PARTS) if count > 1 else out, exist_ok=True)
    done = done_paths(out)
    mine = [k for k in source.keys[index::count] if k not in done]
    counts = {"total": len(source.keys), "already_done": len(source.keys[index::count]) - len(mine)}
    if count > 1:
        tag = f"{index:05d}-of-{count:05d}.jsonl"
        paths = [os.path.join(out, PARTS, n.replace(".jsonl", f"-{tag}")) for n in (VERDICTS, SKIPPED)]
    else:
        paths = [os.path.join(out, VERDICTS), os.path.join(out, SKIPPED)]
    guard = Guard.from_checkpoint(checkpoint, mesh=mesh, rules="inference" if mesh is not None else "data")
    batch_size = -(-batch_size // guard.batch_multiple) * guard.batch_multiple
    cfg = image_config(checkpoint, guard.config)
    counts["scored"], counts["skipped"] = scan_keys(guard, source, mine, cfg, policy, *paths,
                                                    batch_size=batch_size, progress=progress)
    if count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("safevlm_scan_parts_written")
        if index == 0:
            merge_parts(out)
    if index == 0:
        scan_report.write_report(out, source, blur=blur)
    return counts
