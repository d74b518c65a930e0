"""Tell a completely written PNG from one the scripts are still writing.

The scripts save their images in place rather than by rename, so a file can be seen half
written; only a chunk walk that ends exactly at an intact IEND proves it is whole.
"""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CHUNK_HEADER = struct.Struct(">I4s")
_IHDR_SIZE = struct.Struct(">II")
_MAX_CHUNK_LENGTH = 2**31 - 1  # the PNG spec's limit


def is_complete_png(data: bytes) -> bool:
    """True only for a PNG whose chunks all check out, IHDR first, ending with IEND at the
    very last byte."""
    view = memoryview(data)
    if bytes(view[:8]) != PNG_SIGNATURE:
        return False
    pos = 8
    first = True
    while pos + 12 <= len(view):
        length, kind = _CHUNK_HEADER.unpack_from(view, pos)
        if length > _MAX_CHUNK_LENGTH:
            return False
        end = pos + 12 + length
        if end > len(view):
            return False
        (crc,) = struct.unpack_from(">I", view, end - 4)
        if zlib.crc32(view[pos + 4 : end - 4]) != crc:
            return False
        if first and (kind != b"IHDR" or length != 13):
            return False
        first = False
        if kind == b"IEND":
            return length == 0 and end == len(view)
        pos = end
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
