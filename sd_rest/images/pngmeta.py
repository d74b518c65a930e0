"""Text chunks added to a finished PNG, and the AUTOMATIC1111 "infotext" that one of them holds.

Pure: bytes in, bytes out. The new chunks go just before IEND, so every byte the script wrote
(its IHDR, its image data, any chunk of its own) stays as it was and the pixels cannot change:
a PNG decoder reads text chunks wherever they are between IHDR and IEND. No new dependency:
Pillow could write text chunks, but only by encoding the image again.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from typing import Final

from sd_rest.images.pngfile import chunks, is_complete_png

_IEND_CHUNK_BYTES: Final = 12  # length, type, no data, CRC
_MAX_KEYWORD: Final = 79  # the PNG spec's limit, in bytes


def _check_keyword(keyword: str) -> bytes:
    """A keyword as the PNG spec allows it: 1-79 printable Latin-1 characters, no leading,
    trailing or doubled spaces."""
    try:
        raw = keyword.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"PNG keyword {keyword!r} is not Latin-1") from None
    printable = all(32 <= b <= 126 or 161 <= b <= 255 for b in raw)
    if not (1 <= len(raw) <= _MAX_KEYWORD and printable) or keyword != keyword.strip():
        raise ValueError(f"invalid PNG keyword {keyword!r}")
    if "  " in keyword:
        raise ValueError(f"invalid PNG keyword {keyword!r}")
    return raw


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, and the CRC of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def text_chunk(keyword: str, text: str) -> bytes:
    """tEXt when the text is Latin-1 (every reader takes it), else iTXt: UTF-8, uncompressed,
    no language tag. The same choice Pillow and AUTOMATIC1111 make."""
    key = _check_keyword(keyword)
    if "\0" in text:
        raise ValueError(f"the text of PNG chunk {keyword!r} contains a NUL")
    try:
        return chunk(b"tEXt", key + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:
        # keyword, NUL, compression flag 0, method 0, empty language tag and translated
        # keyword (each NUL-terminated), then the text.
        return chunk(b"iTXt", key + b"\0\0\0\0\0" + text.encode("utf-8"))


def add_text_chunks(png: bytes, texts: Sequence[tuple[str, str]]) -> bytes:
    """`png` with a text chunk for each (keyword, text) inserted just before IEND. ValueError
    for anything but a complete PNG (the chunk walk of pngfile) or a text no chunk can hold."""
    if not is_complete_png(png):
        raise ValueError("not a complete PNG")
    added = b"".join(text_chunk(keyword, text) for keyword, text in texts)
    iend = len(png) - _IEND_CHUNK_BYTES  # is_complete_png: IEND is the last 12 bytes
    return png[:iend] + added + png[iend:]


# --- AUTOMATIC1111's infotext -----------------------------------------------------------------
#
# Its documented layout: the prompt (any number of lines), an optional line starting with
# "Negative prompt:", and a last line of `Key: value` pairs separated by ", ". A value holding
# a comma, a colon or a line break is written as a JSON string, which its reader decodes.

Setting = tuple[str, int | float | str | None]


def quote(value: str) -> str:
    """A setting's value as the infotext line needs it: as is, or as a JSON string when it
    holds what would end or split it (a comma, a colon, a line break, a leading quote)."""
    if any(mark in value for mark in ",:\n\r") or value.startswith('"'):
        return json.dumps(value, ensure_ascii=False)
    return value


def _value(value: int | float | str) -> str:
    if isinstance(value, float) and value.is_integer():
        return f"{value:.1f}"  # 7.0, as AUTOMATIC1111 writes a float setting
    return str(value)


def infotext(prompt: str | None, settings: Sequence[Setting]) -> str:
    """The text of a `parameters` chunk: the prompt on its own line(s) (none for a job
    without one), then the settings' line; settings whose value is None are left out."""
    line = ", ".join(
        f"{key}: {quote(_value(value))}" for key, value in settings if value is not None
    )
    if not prompt:
        return line
    # Line breaks as the reader splits them: a lone CR would join two lines into one.
    return prompt.replace("\r\n", "\n").replace("\r", "\n") + "\n" + line


def read_text(png: bytes, keyword: str) -> str | None:
    """The text of the first tEXt or uncompressed iTXt chunk named `keyword`, as
    `text_chunk` writes them; None when there is none (or the PNG cannot be walked)."""
    key = keyword.encode("latin-1")
    for kind, start, end in chunks(png):
        if kind not in (b"tEXt", b"iTXt"):
            continue
        name, _, rest = png[start + 8 : end - 4].partition(b"\0")
        if name != key:
            continue
        if kind == b"tEXt":
            return rest.decode("latin-1")
        if rest[:1] == b"\0":
            # compression flag 0, method, then language tag and translated keyword
            _, _, after_language = rest[2:].partition(b"\0")
            _, _, text = after_language.partition(b"\0")
            return text.decode("utf-8", "replace")
    return None
