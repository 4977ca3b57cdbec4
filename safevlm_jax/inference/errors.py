"""The error of one request's own input, as opposed to a bug or a bad setting.

`BadRequest`: a request's image is missing, unreadable, corrupt or too large, or its prompt
does not fit the context. A batch that meets one may answer its other requests one by one
(`safevlm_jax.sample --batch_file` writes the error on that request's line); any other
exception stops the batch. A ValueError, so code that treats every bad input alike (the CLIs'
one-line errors, `safevlm_jax.cli`) needs not know it.
"""

from __future__ import annotations


class BadRequest(ValueError):
    """One request cannot be answered because of its own image or prompt (message names it)."""
