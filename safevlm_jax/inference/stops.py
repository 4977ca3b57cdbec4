"""Stop strings on streamed text (OpenAI's `stop`): the answer ends before the first stop string
found, wherever token boundaries fall, and streamed text is held back only while its end could
still be the start of one.

    stops = StopStrings(["\\nUser:", "###"])
    delta, stopped = stops.push("Hello\\nUs")   # "Hello", False: "\\nUs" may start "\\nUser:"
    delta, stopped = stops.push("er: hi")       # "", True: the answer is "Hello"
    tail = stops.flush()                         # the held-back text at the end of an answer
"""

from __future__ import annotations

from typing import Sequence

MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's at most 4; a bound on each


class StopStrings:
    """stops: non-empty strings (at most `MAX_STOPS`)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""  # text not given out yet: it may be the start of a stop

    def push(self, text: str) -> tuple[str, bool]:
        """New text -> (what may be given out now, whether a stop string was found; the text
        from the stop string on is dropped)."""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending = self.pending[:min(found)], ""
            return out, True
        keep = self._held()
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held(self) -> int:
        """The longest end of `pending` that a stop string starts with (shorter than it)."""
        for n in range(min(len(self.pending), max(map(len, self.stops)) - 1), 0, -1):
            end = self.pending[-n:]
            if any(s.startswith(end) for s in self.stops):
                return n
        return 0
