"""Images: safe paths under an image root, guarded decoding, CLIP preprocessing
(docs/architecture.md, "Images").

`preprocess` equals transformers' `CLIPImageProcessor` (PIL backend: shortest side resized
bicubic with PIL, center crop, rescale by 1/255, normalize) but returns channels last,
`[image_size, image_size, 3]` float32, the layout the model takes. `aspect_mode="pad"` first
pads to a square filled with the mean colour, as LLaVA-1.5's training recipe does.

Bounded work for any input: `decode_image` opens only `FORMATS`, chosen by the bytes' content
(never by a file name or a declared type), and refuses more than `max_pixels` before decoding;
refuses aspect ratios beyond `MAX_ASPECT`; `preprocess` pads to a square only images up to
`MAX_SIDE` on their long side (every ordinary photo: exactly LLaVA's result) and shrinks longer
ones first. One image then costs at most ~10 bytes per pixel (decoding RGBA, then RGB).
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings

import numpy as np
from PIL import Image

from safevlm_jax.data.errors import BadRecord

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 64_000_000  # ~8k x 8k; anything bigger is treated as a decompression bomb
# PIL's names of the formats read (a GIF, WebP or TIFF gives its first frame); every other
# PIL plugin (EPS runs Ghostscript, PSD, ICO, ...) is never tried
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
MAX_ASPECT = 200  # long side / short side, as Qwen2-VL's processor: PIL's per-row cost stays small
MAX_SIDE = 4096  # a longer image is shrunk to this before LLaVA's padding, which squares it


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """How images are turned into `pixel_values`.

    image_size: output height = width (the vision tower's `image_size`).
    aspect_mode: "resize" (plain CLIPImageProcessor) or "pad" (LLaVA-1.5: pad to square first).
    max_pixels: images with more pixels are refused before decoding.
    """

    image_size: int = 336
    aspect_mode: str = "pad"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if self.aspect_mode not in ("resize", "pad"):
            raise ValueError(f"aspect_mode must be 'resize' or 'pad', got {self.aspect_mode!r}")

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """The mean colour in 0..255: (122, 116, 104) for CLIP."""
        return tuple(int(m * 255) for m in self.mean)


def resolve_image_path(image_root: str | os.PathLike, relative: str) -> str:
    """The real path of `relative` under `image_root`; refuses anything that leaves the root.

    Raises:
      BadRecord: absolute_image_path, image_path_escapes_root (lexical '..'),
        image_symlink_escapes_root (the resolved path is outside), missing_image.
    """
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or os.path.splitdrive(relative)[0]:
        raise BadRecord("absolute_image_path", f"field 'image' = {relative!r}")
    if ".." in relative.replace("\\", "/").split("/"):
        raise BadRecord("image_path_escapes_root", f"field 'image' = {relative!r}")
    root = os.path.realpath(image_root)
    path = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, path]) != root:
        raise BadRecord("image_symlink_escapes_root", f"field 'image' = {relative!r} resolves to {path}")
    if not os.path.isfile(path):
        raise BadRecord("missing_image", f"no file {os.path.join(image_root, relative)}")
    return path


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes (one of `FORMATS`, recognised by content) -> fully loaded RGB PIL image.

    The size is read from the header and checked against `max_pixels` before any pixel is
    decoded, so a small file claiming huge dimensions costs nothing.

    Raises:
      BadRecord: unsupported_image_format (no format of `FORMATS`), image_too_large,
        aspect_ratio_too_large, corrupt_image (unreadable, truncated).
    """
    try:
        with warnings.catch_warnings():  # we apply our own, lower, limit just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:  # PIL's own hard limit, above ours
        raise BadRecord("image_too_large", str(e)) from e
    except Image.UnidentifiedImageError as e:
        if not any(Image.OPEN[f][1](data[:16]) for f in FORMATS):  # no signature we read
            raise BadRecord("unsupported_image_format",
                            f"the data is not {', '.join(FORMATS[:-1])} or {FORMATS[-1]} "
                            f"(starts with {data[:8]!r})") from e
        raise BadRecord("corrupt_image", f"cannot open image ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise BadRecord("corrupt_image", f"cannot open image ({e})") from e
    width, height = image.size
    if width * height > max_pixels:
        raise BadRecord("image_too_large", f"{width}x{height} = {width * height} pixels > max_pixels={max_pixels}")
    if width == 0 or height == 0:
        raise BadRecord("corrupt_image", f"image has size {width}x{height}")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise BadRecord("aspect_ratio_too_large", f"{width}x{height}: one side is more than {MAX_ASPECT} "
                                                  f"times the other")
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRecord("corrupt_image", f"cannot decode image ({e})") from e


def read_image_file(image_root: str | os.PathLike, relative: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """Checks that `relative` is a decodable image inside `image_root`; returns its bytes."""
    with open(resolve_image_path(image_root, relative), "rb") as f:
        data = f.read()
    decode_image(data, max_pixels)
    return data


def expand_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `expand2square`: pad the short side (centred) with `color`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), color)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def preprocess(image: Image.Image, config: ImageConfig) -> np.ndarray:
    """RGB PIL image -> pixel_values `[image_size, image_size, 3]` float32, channels last."""
    size = config.image_size
    if config.aspect_mode == "pad":
        if max(image.size) > MAX_SIDE:  # the square would be huge: shrink first (not LLaVA's exact result)
            scale = MAX_SIDE / max(image.size)
            image = image.resize(tuple(max(1, round(n * scale)) for n in image.size), Image.Resampling.BICUBIC)
        image = expand_to_square(image, config.pad_color)
    width, height = image.size
    # transformers' get_resize_output_image_size: short side -> size, long side truncated.
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32)
    pixels = pixels * np.float32(1 / 255)
    return (pixels - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)


def load_pixel_values(data: bytes, config: ImageConfig) -> np.ndarray:
    """Encoded image bytes -> `[image_size, image_size, 3]` float32."""
    return preprocess(decode_image(data, config.max_pixels), config)
