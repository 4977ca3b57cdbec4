"""What the engine keeps of recent requests, bounded and least-recently-used first out
(host bookkeeping; the values are opaque, e.g. device arrays, each with its size in bytes):

    verdicts = LRU(max_bytes=...)                   # image hash -> CLIP features and verdict
    prefixes = PrefixCache(max_bytes=..., image_token_id=32000)
    prefixes.add(ids, image_hash, prefix, nbytes)   # a prefilled prompt (or a finished row)
    hit = prefixes.lookup(new_ids, image_hash)      # (prefix, tokens it can give the new one)

A prefix matches a new prompt over their common leading ids; its image positions match only
when both came from the same image (same hash: the ids of image positions are all alike),
so the reusable part ends before the first image position otherwise. At least one token is
always left to prefill, whose logits give the first answer token.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Hashable, Sequence

import numpy as np


class LRU:
    """A mapping bounded by the total `nbytes` of its values (the least recently used go first;
    a value larger than the bound is not kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes = max_bytes, 0
        self._items: collections.OrderedDict[Hashable, tuple[Any, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any | None:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key][0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        self.pop(key)
        if nbytes > self.max_bytes:
            return
        self._items[key] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self.pop(next(iter(self._items)))

    def pop(self, key: Hashable) -> Any | None:
        value, nbytes = self._items.pop(key, (None, 0))
        self.nbytes -= nbytes
        return value

    def keys(self) -> list[Hashable]:
        """Least recently used first."""
        return list(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


@dataclasses.dataclass(frozen=True)
class PrefixHit:
    """value: the cached prefix; length: the leading tokens of the new prompt it holds."""

    value: Any
    length: int


class PrefixCache:
    """Cached prefixes keyed by their token ids and image hash (None: no image)."""

    def __init__(self, max_bytes: int, image_token_id: int):
        self.image_token_id = image_token_id
        self._lru = LRU(max_bytes)

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def add(self, ids: Sequence[int], image: str | None, value: Any, nbytes: int) -> None:
        """A prefix holding the keys and values of `ids` (its image: `image`)."""
        self._lru.put((tuple(ids), image), value, nbytes)

    def lookup(self, ids: Sequence[int], image: str | None) -> PrefixHit | None:
        """The cached prefix that gives the most leading tokens of `ids` (at most len - 1),
        or None if none gives any; it becomes the most recently used."""
        ids = np.asarray(ids)
        best = None
        for key in self._lru.keys():
            n = self._usable(np.asarray(key[0]), key[1], ids, image)
            if n and (best is None or n >= best[1]):
                best = (key, n)
        if best is None:
            return None
        return PrefixHit(self._lru.get(best[0]), best[1])

    def _usable(self, cached: np.ndarray, cached_image: str | None, ids: np.ndarray, image: str | None) -> int:
        n = min(len(cached), len(ids) - 1)
        differ = np.flatnonzero(cached[:n] != ids[:n])
        n = int(differ[0]) if differ.size else n
        if cached_image != image or image is None:
            at_image = np.flatnonzero(ids[:n] == self.image_token_id)
            n = int(at_image[0]) if at_image.size else n
        return n

    def clear(self) -> None:
        self._lru.clear()
