"""is_complete_png / png_size on real PNG files written by Pillow."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from sd_rest.images.pngfile import PNG_SIGNATURE, is_complete_png, png_size


def noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    rgb = Image.frombytes(
        "RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3))
    )
    return rgb.convert(mode)


def saved(tmp_path: Path, image: Image.Image, **params: object) -> bytes:
    path = tmp_path / "image.png"
    image.save(path, format="PNG", **params)
    return path.read_bytes()


def chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, length) of every chunk, read independently of the code under test."""
    out = []
    pos = 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        out.append((pos, kind, length))
        pos += 12 + length
    return out


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


CASES = [
    ("RGB", (1, 1)),
    ("RGB", (64, 64)),
    ("RGBA", (300, 17)),
    ("L", (17, 300)),
    ("LA", (33, 9)),
    ("P", (50, 40)),
    ("1", (13, 7)),
    ("I;16", (20, 10)),
]


@pytest.mark.parametrize(("mode", "size"), CASES)
def test_pillow_pngs_are_complete_and_sized(
    tmp_path: Path, mode: str, size: tuple[int, int]
) -> None:
    data = saved(tmp_path, noise(mode, size))
    assert is_complete_png(data)
    assert png_size(data) == size


def test_large_image_with_several_idat_chunks(tmp_path: Path) -> None:
    data = saved(tmp_path, noise("RGB", (256, 256)), compress_level=0)
    assert [kind for _, kind, _ in chunks(data)].count(b"IDAT") > 1
    assert is_complete_png(data)
    assert not is_complete_png(data[:-1])
    assert png_size(data) == (256, 256)


def test_ancillary_chunks_are_walked(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a painting of a virus monster playing guitar")
    data = saved(tmp_path, noise("RGB", (8, 8)), pnginfo=info)
    assert b"tEXt" in [kind for _, kind, _ in chunks(data)]
    assert is_complete_png(data)


def test_every_truncation_is_incomplete(tmp_path: Path) -> None:
    data = saved(tmp_path, noise("RGB", (4, 3)))
    assert is_complete_png(data)
    for cut in range(len(data)):
        assert not is_complete_png(data[:cut]), cut


def test_a_file_being_written_in_place_is_complete_only_at_the_end(tmp_path: Path) -> None:
    data = saved(tmp_path, noise("RGBA", (16, 16)))
    target = tmp_path / "00000.png"
    with target.open("wb") as out:
        for start in range(0, len(data), 37):
            out.write(data[start : start + 37])
            out.flush()
            written = target.read_bytes()
            assert is_complete_png(written) == (len(written) == len(data))


def test_a_bad_crc_in_any_chunk_is_rejected(tmp_path: Path) -> None:
    data = saved(tmp_path, noise("RGB", (5, 5)))
    for offset, kind, length in chunks(data):
        crc_at = offset + 8 + length
        broken = bytearray(data)
        broken[crc_at] ^= 0x01
        assert not is_complete_png(bytes(broken)), kind


def test_corrupted_chunk_data_is_rejected(tmp_path: Path) -> None:
    data = saved(tmp_path, noise("RGB", (5, 5)))
    offset, _, length = next(c for c in chunks(data) if c[1] == b"IDAT")
    broken = bytearray(data)
    broken[offset + 8 + length // 2] ^= 0xFF
    assert not is_complete_png(bytes(broken))


def test_trailing_garbage_is_rejected(tmp_path: Path) -> None:
    data = saved(tmp_path, noise("RGB", (5, 5)))
    assert not is_complete_png(data + b"\x00")
    assert not is_complete_png(data + data)


def test_ihdr_must_come_first() -> None:
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(b"\x00\x00"))
    iend = chunk(b"IEND", b"")
    assert is_complete_png(PNG_SIGNATURE + ihdr + idat + iend)
    assert not is_complete_png(PNG_SIGNATURE + iend)
    assert not is_complete_png(PNG_SIGNATURE + idat + ihdr + iend)
    assert not is_complete_png(PNG_SIGNATURE + ihdr + idat + chunk(b"IEND", b"x"))


def test_not_a_png() -> None:
    assert not is_complete_png(b"")
    assert not is_complete_png(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    for data in (b"", b"GIF89a" + bytes(40), PNG_SIGNATURE, PNG_SIGNATURE + bytes(16)):
        with pytest.raises(ValueError):
            png_size(data)


def test_png_size_needs_only_the_header(tmp_path: Path) -> None:
    data = saved(tmp_path, noise("RGB", (640, 384)))
    assert png_size(data[:24]) == (640, 384)
    with pytest.raises(ValueError):
        png_size(data[:23])
