"""Images in requests: `data:` URLs only, decoded under a pixel limit, then CLIP-preprocessed.

The server never fetches anything: `http(s)://`, `file://` and every other scheme are refused
before any I/O, so a request cannot make the server reach the network or read its own files.
Decoding checks the header's size against `max_pixels` before a pixel is decoded
(`safevlm_jax.data.images.decode_image`), so a small file claiming huge dimensions (a
decompression bomb) costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import re

import numpy as np

from safevlm_jax.data.errors import BadRecord
from safevlm_jax.data.images import ImageConfig, decode_image, preprocess
from safevlm_jax.serve.errors import bad_request

_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL)


def data_url_bytes(url: str, param: str) -> bytes:
    """`data:image/<subtype>;base64,<payload>` -> the encoded image bytes.

    Raises APIError 400 naming `param`: code `image_url_not_allowed` for any other scheme,
    `invalid_image_url` for a malformed data URL or a MIME type that is not `image/*`."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme != "data":
        shown = url if len(url) <= 80 else url[:77] + "..."
        raise bad_request(f"only data: URLs are accepted for images (data:image/png;base64,...); "
                          f"this server fetches nothing and reads no local files; got {shown!r}",
                          param, "image_url_not_allowed")
    match = _DATA_URL.fullmatch(url[:5].lower() + url[5:])
    if match is None:
        raise bad_request("malformed data: URL; expected data:image/<type>;base64,<data>",
                          param, "invalid_image_url")
    mime = match["mime"].strip().lower()
    if not mime.startswith("image/"):
        raise bad_request(f"the data: URL has MIME type {mime or 'text/plain'!r}; expected an "
                          f"image (image/png, image/jpeg, image/webp, ...)", param, "invalid_image_url")
    if "base64" not in [p.strip().lower() for p in match["params"].split(";")]:
        raise bad_request("image data: URLs must be base64-encoded (data:image/png;base64,...)",
                          param, "invalid_image_url")
    try:
        return base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"the data: URL's payload is not valid base64 ({e})", param,
                          "invalid_image_url") from e


def pixel_values(data: bytes, config: ImageConfig, param: str) -> np.ndarray:
    """Encoded image bytes -> pixel_values [S, S, 3] float32; APIError 400 with code
    `corrupt_image` or `image_too_large` (the pixel limit is `config.max_pixels`)."""
    try:
        return preprocess(decode_image(data, config.max_pixels), config)
    except BadRecord as e:  # PIL names its in-memory file; the client sent no file
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image data", e.detail)
        raise bad_request(f"cannot use the image: {detail}", param, e.reason) from e
