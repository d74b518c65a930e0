"""Tell a completely written PNG from one the scripts are still writing.

The scripts save their images in place rather than by rename, so a file can be seen half
written; only a chunk walk that ends exactly at an intact IEND proves it is whole.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CHUNK_HEADER = struct.Struct(">I4s")
_IHDR_SIZE = struct.Struct(">II")
_MAX_CHUNK_LENGTH = 2**31 - 1  # the PNG spec's limit


def chunks(data: bytes | memoryview) -> Iterator[tuple[bytes, int, int]]:
    """(type, start, end) of each chunk after the signature, in order, `start` at its length
    field and `end` just past its CRC; the walk stops at the first chunk that does not lie
    whole within `data` (or is longer than the spec allows). Nothing is checked beyond that."""
    view = memoryview(data)
    pos = 8
    while pos + 12 <= len(view):
        length, kind = _CHUNK_HEADER.unpack_from(view, pos)
        end = pos + 12 + length
        if length > _MAX_CHUNK_LENGTH or end > len(view):
            return
        yield kind, pos, end
        pos = end


def is_complete_png(data: bytes) -> bool:
    """True only for a PNG whose chunks all check out, IHDR first, ending with IEND at the
    very last byte."""
    view = memoryview(data)
    if bytes(view[:8]) != PNG_SIGNATURE:
        return False
    first = True
    for kind, pos, end in chunks(view):
        (crc,) = struct.unpack_from(">I", view, end - 4)
        if zlib.crc32(view[pos + 4 : end - 4]) != crc:
            return False
        if first and (kind != b"IHDR" or end - pos != 12 + 13):
            return False
        first = False
        if kind == b"IEND":
            return end - pos == 12 and end == len(view)
    return False


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; ValueError if `data` does not start like a PNG."""
    if len(data) < 24 or data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG file")
    length, kind = _CHUNK_HEADER.unpack_from(data, 8)
    if kind != b"IHDR" or length != 13:
        raise ValueError("PNG file does not start with an IHDR chunk")
    width, height = _IHDR_SIZE.unpack_from(data, 16)
    if width == 0 or height == 0:
        raise ValueError("PNG file has a zero width or height")
    return width, height
