"""Image side: parity with transformers' CLIPImageProcessor (both aspect modes) and with
LLaVA's padding on real photos, guarded path resolution and decoding (formats by content,
pixel and aspect limits, bounded memory)."""

import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import transformers
from PIL import Image

from safevlm_jax.checkpoint.demo import DEMO_DIR
from safevlm_jax.data import photos
from safevlm_jax.data.errors import BadRecord
from safevlm_jax.data.images import (FORMATS, MAX_ASPECT, MAX_SIDE, ImageConfig, decode_image, load_pixel_values,
                                     preprocess, resolve_image_path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_truncated_images_are_corrupt_and_garbage_is_no_supported_format():
    buf = io.BytesIO()
    random_image(64, 64).save(buf, format="JPEG")
    for data, reason in ((buf.getvalue()[:len(buf.getvalue()) // 2], "corrupt_image"),
                         (b"\x89PNG\r\n\x1a\n then no PNG", "corrupt_image"),
                         (b"not an image at all", "unsupported_image_format")):
        with pytest.raises(BadRecord) as e:
            decode_image(data)
        assert e.value.reason == reason


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_the_six_formats_are_read_by_content_gif_and_tiff_first_frame():
    image = random_image(40, 30)
    for fmt in FORMATS:
        decoded = decode_image(encoded(image, fmt))
        assert decoded.size == (40, 30) and decoded.mode == "RGB", fmt
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    for fmt in ("GIF", "TIFF", "WEBP"):
        data = encoded(red, fmt, save_all=True, append_images=[blue], **({"lossless": True} if fmt == "WEBP" else {}))
        assert decode_image(data).getpixel((4, 4)) == (255, 0, 0), fmt


def test_every_other_format_is_refused_and_its_decoder_never_runs(monkeypatch):
    from PIL import EpsImagePlugin

    def never(self):
        raise AssertionError("the EPS plugin was tried (it runs Ghostscript)")
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    image = random_image(16, 12)
    others = {fmt: encoded(image, fmt) for fmt in ("EPS", "ICO", "PCX", "PPM", "TGA", "SGI")}
    others["PDF"] = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    others["SVG"] = b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><rect width="9" height="9"/></svg>'
    for fmt, data in others.items():
        with pytest.raises(BadRecord) as e:
            decode_image(data)
        assert e.value.reason == "unsupported_image_format", fmt


def test_extreme_aspect_ratios_are_refused_before_decoding():
    for width, height in ((MAX_ASPECT * 7 + 1, 7), (3, MAX_ASPECT * 3 + 5)):
        with pytest.raises(BadRecord) as e:  # the header alone: a decode would find no pixels
            decode_image(png_header_claiming(width, height))
        assert e.value.reason == "aspect_ratio_too_large"
    assert decode_image(encoded(random_image(MAX_ASPECT * 2, 2), "PNG")).size == (MAX_ASPECT * 2, 2)


def today_pad_preprocess(image: Image.Image, config: ImageConfig) -> np.ndarray:
    """LLaVA-1.5's recipe as written: expand2square, then CLIP's resize, crop and normalize."""
    square = llava_expand2square(image, config.pad_color)
    size = config.image_size
    pixels = np.asarray(square.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) * np.float32(1 / 255)
    return (pixels - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)


def test_pad_mode_equals_llava_exactly_on_the_sample_photos_and_demo_images():
    images = {name: Image.fromarray(photos.load(name)) for name in photos.SAMPLE_PHOTOS}
    for name in sorted(os.listdir(os.path.join(DEMO_DIR, "examples"))):
        with Image.open(os.path.join(DEMO_DIR, "examples", name)) as im:
            images[name] = im.convert("RGB")
    assert len(images) == 28 + 5 and all(max(im.size) <= MAX_SIDE for im in images.values())
    config = ImageConfig(image_size=336, aspect_mode="pad")
    for name, image in images.items():
        np.testing.assert_array_equal(preprocess(image, config), today_pad_preprocess(image, config), err_msg=name)


def test_images_longer_than_max_side_are_shrunk_before_padding_close_to_llava():
    config = ImageConfig(image_size=336, aspect_mode="pad")
    photo = Image.fromarray(photos.load("astronaut"))
    for size in ((MAX_SIDE + 300, 900), (700, 2 * MAX_SIDE)):
        image = photo.resize(size, Image.Resampling.BICUBIC)
        ours, llava = preprocess(image, config), today_pad_preprocess(image, config)
        assert ours.shape == llava.shape and np.abs(ours - llava).mean() < 0.005


MEASURE_PEAK = """
import io, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # an unbounded image fails, not the host
from PIL import Image
from safevlm_jax.data.images import ImageConfig, load_pixel_values
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
for spec in sys.argv[1:]:
    w, h, mode, aspect = spec.split(",")
    buf = io.BytesIO()
    Image.new(mode, (int(w), int(h)), 90).save(buf, format="PNG")
    before = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    load_pixel_values(buf.getvalue(), ImageConfig(image_size=336, aspect_mode=aspect, max_pixels=25_000_000))
    print(spec, status("VmHWM:") - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_one_image_within_the_pixel_limit_adds_at_most_300_mb_whatever_its_shape():
    """25 M pixels (the server's default limit) as a square, and as strips at the aspect limit,
    RGBA (the costliest decode), both aspect modes: the peak RSS each adds."""
    short = int((25_000_000 / MAX_ASPECT) ** 0.5)
    specs = ["5000,5000,RGBA,pad", f"{short * MAX_ASPECT},{short},RGBA,pad", f"{short},{short * MAX_ASPECT},RGBA,pad",
             f"{short},{short * MAX_ASPECT},RGBA,resize"]
    out = subprocess.run([sys.executable, "-c", MEASURE_PEAK, *specs], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    peaks = dict(line.split() for line in out.stdout.splitlines())
    assert set(peaks) == set(specs)
    for spec, peak in peaks.items():
        assert int(peak) <= 300 * 2**20, (spec, int(peak) / 2**20)


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
