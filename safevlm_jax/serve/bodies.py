"""Request bodies: read on the event loop under a size limit, decoded to JSON in a worker.

    raw = await read_body(request, limit)           # 413 past `limit` bytes
    body = decode_json(raw, limits.max_separators)  # in the server's worker pool; 400 if bad

Decoding is bounded before it starts: Python's JSON parser holds the interpreter lock for the
whole document (~0.6 s for 10 M small values, during which no other request is served), so a
body with more `,` and `:` bytes than the largest request this server answers could hold is
refused unparsed. Integers too long to convert and unpaired surrogates (`"\\ud800"`: not text,
so neither the tokenizer nor the JSON encoder of an error message could take it) are 400s too.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request

from safevlm_jax.serve.errors import APIError, bad_request, param_path

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # only an escape can put one in UTF-8 JSON


async def read_body(request: Request, limit: int) -> bytes:
    """The body's bytes; 413 past `limit` bytes (the rest is read and dropped, up to 8x the
    limit, so the client can read the answer)."""
    length = request.headers.get("content-length", "")
    too_big = APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > 8 * limit or (length.isdigit() and int(length) > 8 * limit):
            raise too_big
    if size > limit:
        raise too_big
    return b"".join(chunks)


def decode_json(raw: bytes, max_separators: int) -> Any:
    """The body as JSON; APIError 400 `invalid_body` past `max_separators`, `invalid_json` if
    it is not JSON, holds an integer too long to convert or an unpaired surrogate."""
    separators = raw.count(b",") + raw.count(b":")
    if separators > max_separators:
        raise bad_request(f"the body holds {separators} ',' and ':'; a request this server can answer "
                          f"holds at most {max_separators}", None, "invalid_body")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise bad_request(f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    if _SURROGATE_ESCAPE.search(raw):
        where = _lone_surrogate(body)
        if where is not None:
            raise bad_request(f"{where or 'the body'} holds an unpaired UTF-16 surrogate (\\ud800-\\udfff), "
                              f"which is not text", where or None, "invalid_json")
    return body


def _lone_surrogate(body: Any) -> str | None:
    """The param of the first string (or key) holding an unpaired surrogate ("" for the body
    itself), or None."""
    stack = [(body, ())]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, str) and not _is_text(value):
            return param_path(loc)
        if isinstance(value, dict):
            for key, item in value.items():
                if not _is_text(key):
                    return param_path(loc)
                stack.append((item, (*loc, key)))
        elif isinstance(value, list):
            stack.extend((item, (*loc, i)) for i, item in enumerate(value))
    return None


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
