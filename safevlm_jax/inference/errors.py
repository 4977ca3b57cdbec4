"""The error of one request's own input, as opposed to a bug or a bad setting.

`BadRequest`: a request's image is missing, unreadable, corrupt or too large, a sampling value
is out of range, or its prompt does not fit the context. It carries the field at fault
(`param`) and a stable reason (`code`), so a server maps it to an answer by code, never by its
message. A batch that meets one may answer its other requests one by one (`safevlm_jax.sample
--batch_file` writes the error on that request's line); any other exception stops the batch. A
ValueError, so code that treats every bad input alike (the CLIs' one-line errors,
`safevlm_jax.cli`) needs not know it.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

CONTEXT_LENGTH = "context_length_exceeded"  # the prompt + max_tokens do not fit the context
NO_SAFETY = "no_safety_modules"  # safety asked of a checkpoint without safety modules


class BadRequest(ValueError):
    """One request cannot be answered because of its own input: `param` names the field at
    fault (None: the request as a whole), `code` the reason (`invalid_value`,
    `CONTEXT_LENGTH`, `NO_SAFETY`, or an image's `data.errors.BadRecord` reason)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def is_int(x) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_real(x) -> bool:
    """A real number, not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_finite(x) -> bool:
    """A finite real number (an integer beyond every float is not)."""
    try:
        return is_real(x) and math.isfinite(x)
    except OverflowError:
        return False
