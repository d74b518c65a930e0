"""Advance torch's CPU generator state by W 32-bit words without drawing them.

torch's CPU generator is MT19937 (aten/src/ATen/core/MT19937RNGEngine.h). Its 624-word block is
a window of the untempered word sequence x_k, with x_{k+624} = x_{k+397} ^ twist(x_k, x_{k+1}).
That recurrence is linear over GF(2) with a primitive characteristic polynomial phi of degree
19937, so for any J: x_{s+J+j} = XOR_i g_i x_{s+1+i+j} with g = x^(J-1) mod phi (the shift by
one keeps x_s's 31 dead low bits out). phi comes from Berlekamp-Massey on 2*19937 output bits
(0.06 s, once); x^(J-1) mod phi by square-and-multiply on Python ints (~0.02 s); the XOR of
~10k slices of 624 words with numpy (~0.01 s). numpy is the scripts' (passed in): the driver
imports nothing heavy itself.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

MT_N, MT_M, MT_DEGREE = 624, 397, 19937
_UPPER, _LOWER, _MATRIX_A = 0x80000000, 0x7FFFFFFF, 0x9908B0DF
# torch's serialized CPU generator state (THGeneratorState, the legacy pod):
# the_initial_seed, left, seeded, next, then uint64 state[624], then the normal-sample cache.
_STATE_HEAD = "<Qiiq"
_STATE_ARRAY_OFFSET = 24


def _extend(np: Any, window: Any, count: int) -> Any:
    """The untempered words window[0..623] followed by the next `count` words."""
    x = np.empty(MT_N + count, dtype=np.uint32)
    x[:MT_N] = window
    k0, end, step = MT_N, MT_N + count, MT_N - MT_M
    while k0 < end:  # chunks of 227 words: every input of a chunk lies before it
        k1 = min(k0 + step, end)
        y = (x[k0 - MT_N : k1 - MT_N] & _UPPER) | (x[k0 - MT_N + 1 : k1 - MT_N + 1] & _LOWER)
        mag = np.where(y & 1, np.uint32(_MATRIX_A), np.uint32(0))
        x[k0:k1] = x[k0 - step : k1 - step] ^ (y >> 1) ^ mag
        k0 = k1
    return x


def _popcount(value: int) -> int:
    # int.bit_count is 3.10+; the fork's interpreter may be 3.8 or 3.9
    return value.bit_count() if hasattr(value, "bit_count") else bin(value).count("1")


def _berlekamp_massey(bits: list[bool]) -> tuple[int, int]:
    """Connection polynomial C (bit i = c_i, c_0 = 1) and linear complexity of a GF(2)
    sequence."""
    n = len(bits)
    sequence = int("".join("1" if b else "0" for b in bits), 2)  # bit n-1-k holds s_k
    c, b, length, m = 1, 1, 0, -1
    for i in range(n):
        if _popcount(c & (sequence >> (n - 1 - i))) & 1:
            t = c
            c ^= b << (i - m)
            if 2 * length <= i:
                length, m, b = i + 1 - length, i, t
    return c, length


def _spread_byte(value: int) -> bytes:
    """The 8 bits of `value` with a zero after each: squaring over GF(2) spreads the bits."""
    return int("".join("0" + bit for bit in format(value, "08b")), 2).to_bytes(2, "little")


_SPREAD = [_spread_byte(v) for v in range(256)]


class MersenneJump:
    """Jumps a serialized torch CPU generator state ahead; thread-safe, memoized per distance."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phi: int | None = None
        self._reduction: dict[int, int] = {}  # top byte -> multiple of phi with that top byte
        self._powers: dict[int, int] = {}  # J -> x^(J-1) mod phi

    def _setup(self, np: Any) -> None:
        with self._lock:
            if self._phi is not None:
                return
            seed_window = np.arange(1, MT_N + 1, dtype=np.uint32) * np.uint32(2654435761)
            x = _extend(np, seed_window, 2 * MT_DEGREE + 8)
            c, length = _berlekamp_massey((x[1 : 1 + 2 * MT_DEGREE] & 1).astype(bool).tolist())
            if length != MT_DEGREE:
                raise RuntimeError("MT19937 characteristic polynomial not found")
            phi = int(format(c, f"0{length + 1}b")[::-1], 2)  # x^L C(1/x)
            for q in range(256):
                p = 0
                for i in range(8):
                    if q >> i & 1:
                        p ^= phi << i
                self._reduction[p >> MT_DEGREE] = p
            self._phi = phi

    def _reduce(self, r: int) -> int:
        while True:
            bits = r.bit_length()
            if bits <= MT_DEGREE:
                return r
            shift = max(bits - MT_DEGREE - 8, 0)
            r ^= self._reduction[r >> (MT_DEGREE + shift)] << shift

    @staticmethod
    def _square(a: int) -> int:
        data = a.to_bytes((a.bit_length() + 7) // 8 or 1, "little")
        return int.from_bytes(b"".join([_SPREAD[v] for v in data]), "little")

    def _power(self, j: int) -> int:
        """x^(j-1) mod phi, memoized: j depends only on the plan and the start offset."""
        g = self._powers.get(j)
        if g is None:
            assert self._phi is not None
            r = 1
            for bit in bin(j - 1)[2:]:
                r = self._reduce(self._square(r))
                if bit == "1":
                    r <<= 1
                    if r >> MT_DEGREE:
                        r ^= self._phi
            g = self._powers[j] = r
        return g

    def advance(self, np: Any, state: bytes, words: int) -> bytes:
        """`state` (torch.get_rng_state() bytes) after drawing `words` 32-bit words."""
        if words == 0:
            return state
        self._setup(np)
        seed, left, seeded, next_offset = struct.unpack_from(_STATE_HEAD, state, 0)
        window = np.frombuffer(state, dtype="<u8", count=MT_N, offset=_STATE_ARRAY_OFFSET)
        window = window.astype(np.uint32)
        # offset (in this block) of the next word to draw; left == 1: the next block's first
        start = MT_N if left == 1 else next_offset
        last = start + words - 1
        blocks = last // MT_N
        new_next = last - blocks * MT_N + 1
        if blocks:
            g = self._power(MT_N * blocks)
            x = _extend(np, window, MT_DEGREE + MT_N + 1)[1:]
            coefficients = np.frombuffer(g.to_bytes((MT_DEGREE + 8) // 8, "little"), np.uint8)
            acc = np.zeros(MT_N, dtype=np.uint32)
            for i in np.flatnonzero(np.unpackbits(coefficients, bitorder="little")).tolist():
                acc ^= x[i : i + MT_N]
            window = acc
        out = bytearray(state)
        struct.pack_into(_STATE_HEAD, out, 0, seed, MT_N + 1 - new_next, seeded, new_next)
        out[_STATE_ARRAY_OFFSET : _STATE_ARRAY_OFFSET + 8 * MT_N] = window.astype("<u8").tobytes()
        return bytes(out)


MT_JUMP = MersenneJump()
