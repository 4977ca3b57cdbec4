"""Image side: parity with transformers' CLIPImageProcessor (both aspect modes), guarded
path resolution and decoding."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
import transformers
from PIL import Image

from safevlm_jax.data.errors import BadRecord
from safevlm_jax.data.images import (ImageConfig, decode_image, load_pixel_values, preprocess,
                                     resolve_image_path)


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def hf_processor(size):
    return transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def llava_expand2square(pil_img, background_color):
    """LLaVA's train.py helper, as written there."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


SIZES = [(50, 37), (37, 50), (64, 64), (401, 300), (29, 28)]


@pytest.mark.parametrize("size", [28, 336])
@pytest.mark.parametrize("wh", SIZES)
def test_resize_mode_equals_clip_image_processor(size, wh):
    image = random_image(*wh)
    ref = hf_processor(size)(images=image, return_tensors="np")["pixel_values"][0]  # [3, H, W]
    ours = preprocess(image, ImageConfig(image_size=size, aspect_mode="resize"))
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.transpose(1, 2, 0), atol=1e-5)


@pytest.mark.parametrize("wh", SIZES)
def test_pad_mode_equals_llava_expand2square_then_clip(wh):
    image = random_image(*wh, seed=1)
    processor = hf_processor(28)
    background = tuple(int(x * 255) for x in processor.image_mean)
    assert background == (122, 116, 104)
    ref = processor(images=llava_expand2square(image, background), return_tensors="np")["pixel_values"][0]
    ours = preprocess(image, ImageConfig(image_size=28, aspect_mode="pad"))
    np.testing.assert_allclose(ours, ref.transpose(1, 2, 0), atol=1e-5)


def test_grayscale_and_rgba_are_converted_to_rgb():
    for mode in ("L", "RGBA", "P"):
        buf = io.BytesIO()
        random_image(30, 20).convert(mode).save(buf, format="PNG")
        assert load_pixel_values(buf.getvalue(), ImageConfig(image_size=28)).shape == (28, 28, 3)


def png_header_claiming(width, height):
    """A tiny PNG whose IHDR claims width x height (the pixel data is not there)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 100_000])  # below / above PIL's own bomb limit
def test_huge_dimensions_are_refused_before_decoding(side):
    with pytest.raises(BadRecord) as e:
        decode_image(png_header_claiming(side, side), max_pixels=64_000_000)
    assert e.value.reason == "image_too_large"


def test_pixel_limit_is_configurable():
    buf = io.BytesIO()
    random_image(100, 100).save(buf, format="PNG")
    decode_image(buf.getvalue(), max_pixels=10_000)
    with pytest.raises(BadRecord, match="image_too_large"):
        decode_image(buf.getvalue(), max_pixels=9_999)


def test_truncated_and_garbage_images_are_corrupt():
    buf = io.BytesIO()
    random_image(64, 64).save(buf, format="JPEG")
    for data in (buf.getvalue()[:len(buf.getvalue()) // 2], b"not an image at all"):
        with pytest.raises(BadRecord) as e:
            decode_image(data)
        assert e.value.reason == "corrupt_image"


def test_paths_cannot_leave_the_image_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside.png"
    (root / "sub").mkdir(parents=True)
    random_image(8, 8).save(outside)
    random_image(8, 8).save(root / "sub" / "ok.png")
    os.symlink(outside, root / "link.png")
    os.symlink(root / "sub", root / "dirlink")
    assert resolve_image_path(root, "sub/ok.png") == os.path.realpath(root / "sub" / "ok.png")
    assert resolve_image_path(root, "dirlink/ok.png") == os.path.realpath(root / "sub" / "ok.png")
    cases = {"../outside.png": "image_path_escapes_root", "sub/../../outside.png": "image_path_escapes_root",
             str(outside): "absolute_image_path", "link.png": "image_symlink_escapes_root",
             "sub/missing.png": "missing_image", "sub": "missing_image"}
    for relative, reason in cases.items():
        with pytest.raises(BadRecord) as e:
            resolve_image_path(root, relative)
        assert e.value.reason == reason, relative
