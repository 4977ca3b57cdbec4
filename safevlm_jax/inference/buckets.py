"""Fixed shapes for jitted programs: lengths and batch sizes padded up to a few buckets, so a
new request recompiles only when it falls in a new bucket."""

from __future__ import annotations

from typing import Sequence

import numpy as np

PROMPT_BUCKETS = (32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
NEW_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# cache slots a continuous-batching decode step reads: at most twice what it needs, and few
# enough programs to compile them all at warm-up
DECODE_LENGTH_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192)


def bucket(n: int, buckets: Sequence[int], what: str = "length") -> int:
    """The smallest bucket >= n (ValueError past the largest)."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


def capped(buckets: Sequence[int], largest: int) -> tuple[int, ...]:
    """The buckets below `largest`, then `largest` itself (a program's own limit)."""
    return tuple(b for b in buckets if b < largest) + (largest,)


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """Pads axis 0 to `rows` by repeating row 0 (a real row: no all-padding attention)."""
    if a.shape[0] == rows:
        return a
    return np.concatenate([a, np.repeat(a[:1], rows - a.shape[0], axis=0)], axis=0)
