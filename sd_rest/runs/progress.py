"""Turn the Stable Diffusion scripts' merged terminal output into progress.

The scripts draw tqdm bars on stderr and print plain lines on stdout; the server reads both
from one pty in arbitrary byte chunks. Bars are redrawn in place: every redraw starts with
``\\r`` and is left unterminated, nested bars add ``\\n`` and ``ESC[A`` to move the cursor.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

# Segments end at either byte: `\r` for bar redraws, `\n` (or the pty's `\r\n`) for lines.
# Splitting bytes rather than text keeps multi-byte characters such as `█` whole.
_SEGMENT_END = re.compile(rb"[\r\n]")

# CSI sequences (cursor moves, line clears), OSC titles, two-byte escapes, and any ESC left
# over when a sequence was cut short.
_ANSI = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_]|)")

# A tqdm bar at the start of a segment. Either `desc: NN%|bar| n/total [` or, when the
# iterable has no length, `desc: Nit [`; the description is optional. The number must be
# followed by its delimiter so that a redraw cut mid-number ("| 1" of "| 12/80 [") does not
# match. The stats bracket is consumed when complete so that text the other stream appended
# after the bar can be kept.
_BAR = re.compile(
    r"\s*(?:(?P<desc>[^\s|].*?):\s+)?"
    r"(?:\d{1,3}%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)|(?P<count>\d+)it)"
    r" \[(?:[^\]]*\])?"
)

_OUTER_DESCS = frozenset({"Sampling"})
_SAMPLER_DESCS = frozenset({"DDIM Sampler", "PLMS Sampler", "Decoding image"})

# A line Python prints for an uncaught exception: `[pkg.mod.]NameError[: message]`.
_EXCEPTION_LINE = re.compile(
    r"(?:[A-Za-z_]\w*\.)*(?:[A-Za-z_]\w*)?(?:Error|Exception|Interrupt|Exit)(?::\s.*|:)?"
)

# A line that calls itself an error ("CUDA error: …", "txt2img.py: error: …").
_ERROR_WORD = re.compile(r"(?i)\berror\b")

# A pending segment longer than this is flushed as a line: output without any `\r` or `\n`
# must not grow the buffer without bound.
_MAX_PENDING = 64 * 1024


@dataclass(frozen=True)
class Progress:
    batches_done: int
    step: int
    steps_total: int

    @property
    def fraction(self) -> float:
        """How far the current batch's sampler has got, 0..1."""
        if self.steps_total <= 0:
            return 0.0
        return min(1.0, max(0.0, self.step / self.steps_total))


@dataclass(frozen=True)
class _Bar:
    """One parsed bar: its kind, count and total, and any text glued on after it."""

    kind: str  # "outer", "sampler" or "other"
    n: int
    total: int | None
    trailing: str


def strip_ansi(data: bytes) -> bytes:
    return _ANSI.sub(b"", data)


def _decode(segment: bytes) -> str:
    return strip_ansi(segment).decode("utf-8", errors="replace")


def _parse_bar(text: str) -> _Bar | None:
    match = _BAR.match(text)
    if match is None:
        return None
    desc = match["desc"]
    if match["count"] is not None:
        n, total = int(match["count"]), None
    else:
        n, total = int(match["n"]), int(match["total"])
    if desc is None or desc in _OUTER_DESCS:
        kind = "outer"
    elif desc in _SAMPLER_DESCS:
        kind = "sampler"
    else:
        kind = "other"
    return _Bar(kind, n, total, text[match.end() :].strip())


def _advance(current: Progress | None, bar: _Bar) -> Progress | None:
    """The progress after `bar`; it only ever moves forward."""
    if bar.kind == "other":
        return current
    base = current or Progress(0, 0, 0)
    if bar.kind == "outer":
        if current is None or bar.n > base.batches_done:
            return Progress(max(bar.n, base.batches_done), 0, base.steps_total)
        return current
    # A stale redraw (n below the step already seen) is ignored; an equal n can still carry
    # the first sight of the total.
    if current is not None and bar.n < base.step:
        return current
    total = bar.total if bar.total is not None else base.steps_total
    return Progress(base.batches_done, bar.n, total)


class ProgressParser:
    """Incremental parser: feed it chunks, read progress and the recent plain lines."""

    def __init__(self, max_lines: int = 200) -> None:
        self._pending = b""
        self._progress: Progress | None = None
        self._lines: deque[str] = deque(maxlen=max_lines)

    @property
    def progress(self) -> Progress | None:
        return self._progress

    def recent_lines(self) -> list[str]:
        return list(self._lines)

    def feed(self, data: bytes) -> Progress | None:
        """Consume a chunk; return the new progress if it changed, else None."""
        before = self._progress
        buffer = self._pending + data if self._pending else bytes(data)
        end = max(buffer.rfind(b"\r"), buffer.rfind(b"\n"))
        if end >= 0:
            for segment in _SEGMENT_END.split(buffer[:end]):
                self._take_line(segment)
            buffer = buffer[end + 1 :]
        if len(buffer) > _MAX_PENDING:
            self._take_line(buffer)
            buffer = b""
        self._pending = buffer
        # The newest redraw stays unterminated until the next one, which may be seconds
        # away: read it now if it already holds a whole bar. Every bar's numbers end at " [",
        # so without it there is nothing to parse yet (a cheap test on every chunk).
        if b" [" in buffer:
            bar = _parse_bar(_decode(buffer))
            if bar is not None:
                self._progress = _advance(self._progress, bar)
        return self._progress if self._progress != before else None

    def finish(self) -> None:
        """End of stream: the unterminated tail is a line of its own."""
        if self._pending:
            self._take_line(self._pending)
            self._pending = b""

    def _take_line(self, segment: bytes) -> None:
        if not segment:
            return
        text = _decode(segment)
        bar = _parse_bar(text)
        if bar is None:
            self._keep(text)
            return
        self._progress = _advance(self._progress, bar)
        # The other stream's output lands right after an unterminated bar.
        self._keep(bar.trailing)

    def _keep(self, text: str) -> None:
        text = text.rstrip()
        if text.strip():
            self._lines.append(text)


def _clean(line: str) -> str:
    return _decode(line.encode("utf-8", errors="replace")).strip()


def is_bar_line(line: str) -> bool:
    """Whether a line is a progress bar (of any description)."""
    return _parse_bar(_clean(line)) is not None


def last_error(lines: Sequence[str]) -> str | None:
    """The line that best explains a failure: the last exception line, else the last line
    that says it is an error (or the shell's `Killed`). An ordinary line never counts, and
    neither does a bar or a warning: None when nothing looks like an error."""
    candidates = [
        stripped for line in lines if (stripped := _clean(line)) and _parse_bar(stripped) is None
    ]
    for line in reversed(candidates):
        if _EXCEPTION_LINE.fullmatch(line):
            return line
    for line in reversed(candidates):
        if (_ERROR_WORD.search(line) and "Warning" not in line) or line == "Killed":
            return line
    return None
