"""Memory the server frees goes back to the system (glibc; elsewhere this does nothing).

glibc serves a buffer of more than 128 KiB from its own mapping, which `free` unmaps, but after
the first such free it raises that threshold up to the freed size (32 MiB at most), so later
large buffers (a request body, its JSON string, a decoded image) come from heaps that keep
their pages once freed: after a run of large requests the server stayed ~0.4 GB bigger
(benchmarks/serve_hostile.py). A fixed threshold keeps every buffer of a MiB or more mapped.
"""

from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


def keep_large_buffers_mapped(threshold: int = 2**20) -> None:
    """Buffers of `threshold` bytes or more get their own mapping, returned when freed (for
    the whole process: call once, at start)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, threshold)
