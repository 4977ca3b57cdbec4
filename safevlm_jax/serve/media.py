"""Images in requests: `data:` URLs (or fetched bytes) decoded under a pixel limit, then
CLIP-preprocessed.

    pixels = load(image_ref, image_config)   # in the server's worker pool; APIError 400 if bad

`http(s)://` URLs are fetched by `fetch.py`, only from the domains the server allows;
`file://` and every other scheme are refused before any I/O, so a request cannot make the
server read its own files.
Decoding (`safevlm_jax.data.images.decode_image`) reads PNG, JPEG, WebP, GIF, BMP and TIFF,
recognised by content whatever MIME type the URL declares, and checks the header's size and
aspect ratio before a pixel is decoded, so a small file claiming huge dimensions (a
decompression bomb) costs nothing and any image's memory is bounded.
"""

from __future__ import annotations

import base64
import binascii
import re

import numpy as np

from safevlm_jax.data.errors import BadRecord
from safevlm_jax.data.images import ImageConfig, decode_image, preprocess
from safevlm_jax.serve.errors import bad_request
from safevlm_jax.serve.schemas import ImageRef

_HEADER = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*)", re.IGNORECASE)


def load(ref: ImageRef, config: ImageConfig) -> np.ndarray:
    """An image part -> pixel_values [S, S, 3] float32; APIError 400 naming its param."""
    return pixel_values(data_url_bytes(ref.url, ref.param), config, ref.param)


def data_url_bytes(url: str, param: str) -> bytes:
    """`data:image/<subtype>;base64,<payload>` -> the encoded image bytes.

    Raises APIError 400 naming `param`: code `image_url_not_allowed` for any other scheme,
    `invalid_image_url` for a malformed data URL or a MIME type that is not `image/*`."""
    colon = url.find(":", 0, 64)
    if url[:colon].lower() != "data" or colon < 0:
        shown = url if len(url) <= 80 else url[:77] + "..."
        raise bad_request(f"images are data: URLs (data:image/png;base64,...) or http(s) URLs on the "
                          f"domains the server allows; it reads no local files; got {shown!r}",
                          param, "image_url_not_allowed")
    comma = url.find(",", 0, 256)
    match = _HEADER.fullmatch(url[:comma]) if comma >= 0 else None
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
        return base64.b64decode(url[comma + 1:], validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"the data: URL's payload is not valid base64 ({e})", param,
                          "invalid_image_url") from e


def pixel_values(data: bytes, config: ImageConfig, param: str) -> np.ndarray:
    """Encoded image bytes -> pixel_values [S, S, 3] float32; APIError 400 with code
    `unsupported_image_format`, `corrupt_image`, `image_too_large` (the pixel limit is
    `config.max_pixels`) or `aspect_ratio_too_large`."""
    try:
        return preprocess(decode_image(data, config.max_pixels), config)
    except BadRecord as e:  # PIL names its in-memory file; the client sent no file
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image data", e.detail)
        raise bad_request(f"cannot use the image: {detail}", param, e.reason) from e
