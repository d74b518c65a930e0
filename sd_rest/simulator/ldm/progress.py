"""Progress bars that print exactly what tqdm prints to a stream, byte for byte.

The server parses the real scripts' tqdm output, so the simulator reproduces its format,
its nesting (a bar below others moves the cursor down with newlines and back up with
ESC[A), its redraw rate limit and its final redraw on close. tqdm itself is not a
dependency of the simulator: the format is re-implemented here from its observable output.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")

# A space, then the eighths ▏▎▍▌▋▊▉ and the full block █ (U+258F down to U+2588).
BLOCKS = " " + "".join(chr(code) for code in range(0x258F, 0x2587, -1))
BAR_WIDTH = 10  # tqdm's width when it cannot size the bar to a terminal
MIN_INTERVAL = 0.1  # seconds between two redraws while running
SMOOTHING = 0.3  # weight of the newest sample in the displayed rate
CURSOR_UP = "\x1b[A"

DrawHook = Callable[[int, int | None], None]


def format_interval(seconds: float) -> str:
    """[H:]MM:SS, hours only when there are any."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{minutes:02d}:{secs:02d}"


def render_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """Full blocks, one partial eighth block, then spaces: always `width` characters."""
    eighths = len(BLOCKS) - 1
    full, partial = divmod(int(fraction * width * eighths), eighths)
    if full >= width:
        return BLOCKS[-1] * width
    return BLOCKS[-1] * full + BLOCKS[partial] + BLOCKS[0] * (width - full - 1)


def format_rate(rate: float | None) -> str:
    """`12.34it/s`, or `s/it` once an iteration takes more than a second; `?` if unknown."""
    if not rate:
        return "?it/s"
    if 1 / rate > 1:
        return f"{1 / rate:5.2f}s/it"
    return f"{rate:5.2f}it/s"


def format_meter(
    n: int, total: int | None, elapsed: float, desc: str = "", rate: float | None = None
) -> str:
    """One bar line without the leading carriage return; rate defaults to the overall mean."""
    if rate is None and elapsed:
        rate = n / elapsed
    prefix = desc if desc.endswith(": ") else f"{desc}: " if desc else ""
    rate_text = format_rate(rate)
    if not total:
        return f"{prefix}{n}it [{format_interval(elapsed)}, {rate_text}]"
    fraction = n / total
    remaining = format_interval((total - n) / rate) if rate else "?"
    return (
        f"{prefix}{fraction * 100:3.0f}%|{render_bar(fraction)}| {n}/{total} "
        f"[{format_interval(elapsed)}<{remaining}, {rate_text}]"
    )


class _Average:
    """Exponential moving average, corrected for its start at zero."""

    def __init__(self, smoothing: float) -> None:
        self.alpha = smoothing
        self.last = 0.0
        self.calls = 0

    def add(self, sample: float) -> None:
        self.last = self.alpha * sample + (1 - self.alpha) * self.last
        self.calls += 1

    def value(self) -> float:
        if not self.calls:
            return self.last
        return self.last / (1 - (1 - self.alpha) ** self.calls)


_open_positions: set[int] = set()


class Bar:
    """One bar. Bars opened while others are open are drawn on the lines below them."""

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        stream: TextIO | None = None,
        on_draw: DrawHook | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.total = total
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.on_draw = on_draw
        self.clock = clock
        self.position = next(p for p in range(len(_open_positions) + 1) if p not in _open_positions)
        _open_positions.add(self.position)
        self.n = 0
        self.closed = False
        self._printed_n = 0
        self._printed_len = 0
        self._dn = _Average(SMOOTHING)
        self._dt = _Average(SMOOTHING)
        self.start = self._printed_at = clock()
        self._draw(self.position, self._smoothed_rate())

    def _smoothed_rate(self) -> float | None:
        dt = self._dt.value()
        return self._dn.value() / dt if dt else None

    def _draw(self, position: int, rate: float | None) -> None:
        line = format_meter(self.n, self.total, self.clock() - self.start, self.desc, rate)
        # Spaces wipe what is left of a longer previous line of this bar.
        padding = " " * max(self._printed_len - len(line), 0)
        self._printed_len = len(line)
        self.stream.write("\n" * position + "\r" + line + padding + CURSOR_UP * position)
        self.stream.flush()
        if self.on_draw is not None:
            self.on_draw(self.n, self.total)

    def update(self, increment: int = 1) -> None:
        """Count progress; redraw only if the last redraw is at least MIN_INTERVAL old."""
        self.n += increment
        now = self.clock()
        dt = now - self._printed_at
        if dt < MIN_INTERVAL:
            return
        dn = self.n - self._printed_n
        if dt and dn:
            self._dn.add(dn)
            self._dt.add(dt)
        self._draw(self.position, self._smoothed_rate())
        self._printed_n = self.n
        self._printed_at = now

    def close(self) -> None:
        """Draw the final state with the overall mean rate where the cursor is, then a newline."""
        if self.closed:
            return
        self.closed = True
        _open_positions.discard(self.position)
        self._draw(0, None)
        self.stream.write("\n")
        self.stream.flush()


def track(
    items: Iterable[T],
    desc: str = "",
    total: int | None = None,
    on_draw: DrawHook | None = None,
) -> Iterator[T]:
    """Iterate with a bar, like iterating over a tqdm; the total defaults to len(items)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = Bar(total, desc, on_draw=on_draw)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        # Also on an exception in the loop body, when the generator is discarded.
        bar.close()
