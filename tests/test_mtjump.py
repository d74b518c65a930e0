"""The worker's Mersenne-Twister jump-ahead, checked against Python's own MT19937 (the `random`
module runs the same recurrence as torch's CPU generator): jumping a state by W words must give
exactly the state drawing W words gives. No torch needed; torch's serialized layout is made here
from Python's state."""

from __future__ import annotations

import importlib.util
import random
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT

MT_N = 624
HEAD = "<Qiiq"  # torch's THGeneratorState: initial seed, left, seeded, next
NORMAL_CACHE = b"\x00" * 24  # what follows the 624 words; the jump must leave it as it is


def load_mtjump() -> object:
    # The driver's modules are run by the fork's interpreter, not imported as sd_rest.*: load
    # this one on its own, as a file.
    path = ROOT / "sd_rest" / "worker_driver" / "mtjump.py"
    spec = importlib.util.spec_from_file_location("mtjump_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mtjump = load_mtjump()


def torch_state(generator: random.Random, seed: int) -> bytes:
    """Python's MT state in torch's serialized layout."""
    _, internal, _ = generator.getstate()
    words, position = internal[:MT_N], internal[MT_N]
    head = struct.pack(HEAD, seed, MT_N + 1 - position, 1, position)
    return head + struct.pack(f"<{MT_N}Q", *words) + NORMAL_CACHE


def python_words(state: bytes) -> tuple[tuple[int, ...], int]:
    """The 624 words and the position of the next one, read back from torch's layout."""
    _, left, _, position = struct.unpack_from(HEAD, state, 0)
    words = struct.unpack_from(f"<{MT_N}Q", state, struct.calcsize(HEAD))
    assert left == MT_N + 1 - position
    return words, position


def draw(generator: random.Random, words: int) -> None:
    while words:  # getrandbits(32 * k) draws k words in order, in C
        chunk = min(words, 100_000)
        generator.getrandbits(32 * chunk)
        words -= chunk


@pytest.mark.parametrize("seed", [42, 7, 2**32 - 1])
@pytest.mark.parametrize("words", [0, 1, 623, 624, 625, 1_249, 40_000, 2_496_811])
def test_a_jump_lands_where_drawing_does(seed: int, words: int) -> None:
    generator = random.Random(seed)
    draw(generator, 5)  # start mid-block, as after a seed_everything's own draws
    state = torch_state(generator, seed)
    jumped = mtjump.MT_JUMP.advance(np, state, words)  # type: ignore[attr-defined]
    draw(generator, words)
    _, internal, _ = generator.getstate()
    got_words, got_position = python_words(jumped)
    if (got_position, internal[MT_N]) == (0, MT_N):
        # At a block's end Python keeps the spent block ("position 624") and makes the next
        # when it needs a word; the jump has made it already ("position 0"): the same place.
        assert following(got_words, got_position) == following(internal[:MT_N], MT_N)
    else:
        assert (got_words, got_position) == (tuple(internal[:MT_N]), internal[MT_N])
    assert following(got_words, got_position) == [generator.getrandbits(32) for _ in range(3)]
    assert jumped[-len(NORMAL_CACHE) :] == NORMAL_CACHE
    assert struct.unpack_from("<Q", jumped, 0)[0] == seed


def following(words: tuple[int, ...], position: int) -> list[int]:
    """The next three draws from that state."""
    generator = random.Random()
    generator.setstate((3, (*words, position), None))
    return [generator.getrandbits(32) for _ in range(3)]


def test_jumps_are_memoized_per_distance() -> None:
    generator = random.Random(3)
    state = torch_state(generator, 3)
    jump = mtjump.MersenneJump()  # type: ignore[attr-defined]
    first = jump.advance(np, state, 10_000)
    assert jump.advance(np, state, 10_000) == first
    assert len(jump._powers) == 1


def test_the_module_stays_importable_on_the_forks_interpreter() -> None:
    # stdlib only at import: numpy comes from the caller (the scripts imported it).
    source = (Path(mtjump.__file__)).read_text()  # type: ignore[attr-defined]
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert imports == [
        "from __future__ import annotations",
        "import struct",
        "import threading",
        "from typing import Any",
    ]
