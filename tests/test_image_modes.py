"""Context frames in every PIL mode (evdm.sample_io.open_image): real files written here, 16-bit scaled
to 8-bit (not clipped to white), palette, LA, CMYK as their colours, what has no white level refused."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evdm import sample_io as sampling

SIZE = 8


def load_image(path, size: int, color_mode: str):
    """What sample.py reads from an endpoint image: uint8 [size, size, C], centre-cropped."""
    return sampling.to_array(sampling.open_image(path, color_mode), size)


def write_png16_rgb(path: Path, rgb: np.ndarray) -> None:
    """A 48-bit RGB PNG (PIL cannot write one): uint16 [H, W, 3], by the PNG spec's chunks."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def mode_of(path: Path) -> str:
    with Image.open(path) as img:
        return img.mode


def gradient16() -> np.ndarray:
    """uint16 [SIZE, SIZE] spanning 0..65535, most values far above 255."""
    return np.linspace(0, 65535, SIZE * SIZE).round().astype(np.uint16).reshape(SIZE, SIZE)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = gradient16()
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert mode_of(tmp_path / "g16.png") == "I;16"
    expected = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
    gray = load_image(tmp_path / "g16.png", SIZE, "gray")
    assert np.array_equal(gray[..., 0], expected)
    assert (gray < 255).mean() > 0.9  # PIL's own conversion leaves all but the zero pixel at 255
    rgb = load_image(tmp_path / "g16.png", SIZE, "rgb")
    assert all(np.array_equal(rgb[..., c], expected) for c in range(3))


def test_48_bit_rgb_png_keeps_its_colours(tmp_path):
    values = np.stack([gradient16(), gradient16()[::-1], np.full((SIZE, SIZE), 32768, np.uint16)], axis=-1)
    write_png16_rgb(tmp_path / "rgb16.png", values)
    rgb = load_image(tmp_path / "rgb16.png", SIZE, "rgb").astype(int)
    assert np.abs(rgb - values.astype(int) * 255 / 65535).max() <= 1


def test_palette_images_with_and_without_transparency(tmp_path):
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    paletted = Image.fromarray(colours).quantize(16)
    paletted.save(tmp_path / "p.png")
    paletted.save(tmp_path / "p_transparent.png", transparency=bytes([0, 128, 255]))  # alpha of entries 0-2
    expected = np.asarray(paletted.convert("RGB"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when a palette's per-entry alpha is dropped carelessly
        for name in ("p.png", "p_transparent.png"):
            assert mode_of(tmp_path / name) == "P"
            assert np.array_equal(load_image(tmp_path / name, SIZE, "rgb"), expected)


def test_la_keeps_its_grey_and_ignores_alpha(tmp_path):
    grey = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE) * 3
    alpha = np.full((SIZE, SIZE), 128, np.uint8)
    Image.fromarray(np.stack([grey, alpha], axis=-1), "LA").save(tmp_path / "la.png")
    assert np.array_equal(load_image(tmp_path / "la.png", SIZE, "gray")[..., 0], grey)
    assert np.array_equal(load_image(tmp_path / "la.png", SIZE, "rgb")[..., 1], grey)


def test_cmyk_converts_to_its_rgb_colours(tmp_path):
    cmyk = np.zeros((SIZE, SIZE, 4), np.uint8)
    cmyk[:, 2:4, 3] = 255  # black
    cmyk[:, 4:6, 0] = 255  # cyan
    cmyk[:, 6:, 1:3] = 255  # magenta + yellow = red
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    rgb = load_image(tmp_path / "cmyk.tif", SIZE, "rgb")
    for cols, colour in ((slice(0, 2), (255, 255, 255)), (slice(2, 4), (0, 0, 0)), (slice(4, 6), (0, 255, 255)),
                         (slice(6, 8), (255, 0, 0))):
        assert (rgb[:, cols] == colour).all()


@pytest.mark.parametrize("mode, words", [("I", "32-bit integer pixels (mode I)"), ("F", "floating-point pixels (mode F)")])
def test_pixels_without_a_white_level_are_refused_in_one_line(tmp_path, mode, words):
    path = tmp_path / f"{mode}.tif"
    Image.fromarray(gradient16().astype(np.int32 if mode == "I" else np.float32)).save(path)
    assert mode_of(path) == mode
    with pytest.raises(sampling.SamplingError) as err:
        load_image(path, SIZE, "rgb")
    assert str(err.value).startswith(f"{path}: {words}") and "\n" not in str(err.value)
