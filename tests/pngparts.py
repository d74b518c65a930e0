"""Test-side readers of what sd-rest writes into its PNGs, written independently of sd_rest:
a PNG chunk walker, and a parser of AUTOMATIC1111's infotext written from its documented
format (the prompt's lines, an optional `Negative prompt:` line, and a last line of
`Key: value` settings joined by ", ", where a value holding a comma, colon or line break is a
JSON string)."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from typing import Any

from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_KINDS = (b"tEXt", b"iTXt", b"zTXt")
KEY = re.compile(r"\w[\w \-/]*")  # a setting's name: a word character, then words, dashes, slashes


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, checking each CRC."""
    assert png[:8] == SIGNATURE
    out, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack_from(">I", png, pos)
        kind = png[pos + 4 : pos + 8]
        data = png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", png, pos + 8 + length)
        assert zlib.crc32(kind + data) == crc, f"bad CRC in {kind!r}"
        out.append((kind, data))
        pos += 12 + length
    assert out[-1][0] == b"IEND" and pos == len(png)
    return out


def without_text(png: bytes, keywords: set[str]) -> bytes:
    """`png` without the text chunks of these keywords: what it was before they were added."""
    kept = [SIGNATURE]
    for kind, data in chunks(png):
        if kind in TEXT_KINDS and data.split(b"\0", 1)[0].decode("latin-1") in keywords:
            continue
        kept.append(struct.pack(">I", len(data)) + kind + data)
        kept.append(struct.pack(">I", zlib.crc32(kind + data)))
    return b"".join(kept)


def text_chunks(png: bytes) -> dict[str, str]:
    """Every text chunk, read by Pillow (a reader that is not ours)."""
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return dict(image.text)  # type: ignore[attr-defined]


def pixels(png: bytes) -> tuple[str, tuple[int, int], bytes]:
    with Image.open(io.BytesIO(png)) as image:
        return image.mode, image.size, image.tobytes()


def parse_settings(line: str) -> dict[str, Any]:
    """`Key: value, Key: "quoted, value", …` → {key: value}; quoted values decoded."""
    settings: dict[str, Any] = {}
    pos = 0
    while pos < len(line):
        while pos < len(line) and line[pos] == " ":
            pos += 1
        match = KEY.match(line, pos)
        if match is None or line[match.end() : match.end() + 1] != ":":
            break
        key = match.group().strip()
        pos = match.end() + 1
        while pos < len(line) and line[pos] == " ":
            pos += 1
        if line[pos : pos + 1] == '"':
            value, pos = json.JSONDecoder().raw_decode(line, pos)
        else:
            end = line.find(",", pos)
            end = len(line) if end < 0 else end
            value, pos = line[pos:end].strip(), end
        settings[key] = value
        if line[pos : pos + 1] == ",":
            pos += 1
    return settings


def parse_infotext(text: str) -> tuple[str, str, dict[str, Any]]:
    """(prompt, negative prompt, settings). The last line holds the settings when it reads as
    at least three of them; otherwise every line is prompt."""
    lines = text.strip().split("\n")
    settings = parse_settings(lines[-1])
    if len(settings) >= 3:
        lines = lines[:-1]
    else:
        settings = {}
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:") or negative:
            negative.append(line.removeprefix("Negative prompt:").strip())
        else:
            prompt.append(line)
    return "\n".join(prompt), "\n".join(negative), settings
