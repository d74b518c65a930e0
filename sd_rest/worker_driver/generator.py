"""Generator parity: leaving torch's CPU generator where a real model build would have left it.

Building a model draws from the default CPU generator (its random initialisation) after the
script has seeded it and before sampling, so a run that reuses a cached model must move the
generator exactly as far as a build would. The first build of a config is recorded (every aten
op that draws from the default CPU generator, via a TorchDispatchMode, plus the generator state
just before and just after); a GeneratorPlan then picks the cheapest method that reproduces that
first build's end state from its start state:

  jump     advance the Mersenne Twister by the recorded number of words (mtjump);
  replay   draw the recorded ops again on a private generator and scratch buffers;
  rebuild  call the real constructor again and drop the result (the caller does it): the
           fallback when there is no TorchDispatchMode (old torch; sd-rest's simulator), or
           the build drew in a way that cannot be counted or replayed.

A start state equal to the first build's gives its end state at once ("same-seed"), and a
"prepare" hint can compute an end state in the background ("prepared").
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

from . import GENERATOR_ENV
from .mtjump import MT_JUMP

# Diagnostic switch (tests only): replay|rebuild skip the faster methods; replay is still
# checked against the first build before it is used. off: no parity at all (wrong PNGs).
FORCED = os.environ.get(GENERATOR_ENV, "")


def state_bytes(state: Any) -> bytes:
    """A torch.get_rng_state() tensor as bytes (comparable, hashable)."""
    return state.numpy().tobytes()


def state_tensor(torch: Any, data: bytes) -> Any:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class RngOp:
    """One RNG-consuming aten call seen during a build: enough to count or replay its draws."""

    __slots__ = ("args", "contiguous", "dtype", "func", "name", "size", "stride")

    def __init__(self, func: Any, tensor: Any, args: tuple[Any, ...]) -> None:
        self.func = func
        self.name = str(func)
        self.dtype = tensor.dtype
        self.size = tuple(tensor.shape)
        self.stride = tuple(tensor.stride())
        self.contiguous = tensor.is_contiguous()
        self.args = args  # the op's scalar arguments (bounds, mean/std, ...)

    def numel(self) -> int:
        n = 1
        for side in self.size:
            n *= side
        return n


def op_words(torch: Any, op: RngOp) -> int | None:
    """32-bit words the op draws, or None if that is not a fixed function of its shape.

    Rules observed on torch's CPU kernels (checked against the real build before use):
    uniform_: one word per element (two for float64, which draws random64); normal_ on a
    contiguous tensor of >= 16 elements takes the vectorised path: float32/float64 draw one
    uniform per element plus 16 more for a partial last group; half/bfloat16 round up to 16.
    Smaller or strided normal_ uses Box-Muller with a cached second sample: not counted."""
    n = op.numel()
    wide = 2 if op.dtype == torch.float64 else 1
    if op.name == "aten.uniform_.default" and op.dtype.is_floating_point:
        return n * wide
    if op.name == "aten.normal_.default" and op.contiguous and n >= 16:
        if op.dtype in (torch.float32, torch.float64):
            return (n + (16 if n % 16 else 0)) * wide
        if op.dtype in (torch.float16, torch.bfloat16):
            return (n + 15) // 16 * 16
    return None


# Ops that draw and can be replayed from their recorded shape and scalar arguments.
_REPLAYABLE = (
    ("uniform_", "default"), ("normal_", "default"), ("random_", "default"),
    ("random_", "from"), ("random_", "to"), ("bernoulli_", "float"),
    ("exponential_", "default"), ("cauchy_", "default"), ("log_normal_", "default"),
    ("geometric_", "default"),
)  # fmt: skip
# Ops that turn a tensor into a Python value: if one reads random data, what the build does
# next may depend on the draws (e.g. trunc_normal_'s rejection loop), so the draw sequence may
# differ per seed and must not be replayed.
_TO_PYTHON = ("_local_scalar_dense", "is_nonzero", "equal", "item")
# Base names of ops that draw even when their overload has no `generator` argument
# (aten.randn.default, native_dropout, ...): recorded as unsupported, never silently missed.
_RNG_NAMES = frozenset(
    (
        "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
        "normal", "multinomial", "bernoulli", "poisson", "binomial", "native_dropout",
        "_fused_dropout", "dropout", "feature_dropout", "alpha_dropout", "rrelu",
        "rrelu_with_noise", "_standard_gamma", "_sample_dirichlet", "uniform", "random",
        "exponential", "cauchy", "log_normal", "geometric",
    )
)  # fmt: skip


def _aten_ops(aten: Any, names: Any) -> set[Any]:
    found = set()
    for name, overload in names:
        with contextlib.suppress(AttributeError):
            found.add(getattr(getattr(aten, name), overload))
    return found


def make_recorder(torch: Any) -> Any:
    """A TorchDispatchMode that records default-CPU-generator draws, or None without one."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
    except Exception:  # old torch, or a stand-in: the caller falls back to rebuild
        return None
    aten = torch.ops.aten
    replayable = _aten_ops(aten, _REPLAYABLE)
    to_python = _aten_ops(aten, [(name, "default") for name in _TO_PYTHON])
    default_generator = torch.default_generator
    generator_positions: dict[Any, int] = {}  # index of `generator`; -1 none; -2 RNG without

    def generator_position(func: Any) -> int:
        position = generator_positions.get(func)
        if position is None:
            position = -1
            for i, argument in enumerate(func._schema.arguments):
                if argument.name == "generator":
                    position = i
            if position == -1 and func._schema.name.split("::")[-1].rstrip("_") in _RNG_NAMES:
                position = -2
            generator_positions[func] = position
        return position

    def storage_key(t: Any) -> tuple[str, int] | None:
        try:
            if t.device.type == "meta":
                return None
            # torch < 2.0 has no untyped_storage()
            storage = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage()
            return (t.device.type, storage.data_ptr())
        except Exception:
            return None

    class Recorder(TorchDispatchMode):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[RngOp] = []  # in call order
            self.unsupported: list[str] = []  # RNG ops that can be neither counted nor replayed
            self.data_dependent = False
            self._tainted: set[tuple[str, int]] = set()  # storages holding random data

        def _draws_from_default_cpu(self, func: Any, args: Any, kwargs: Any) -> bool:
            position = generator_position(func)
            if position == -1:
                return False
            if position >= 0:
                given = args[position] if position < len(args) else None
                generator = kwargs.get("generator", given)
                if generator is not None and generator is not default_generator:
                    return False
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            device = t.device if t is not None else kwargs.get("device")
            return device is None or torch.device(device).type == "cpu"

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            kwargs = kwargs or {}
            inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            tainted_in = any(storage_key(t) in self._tainted for t in inputs)
            draws = self._draws_from_default_cpu(func, args, kwargs)
            if draws:
                if func in replayable and set(kwargs) <= {"generator"}:
                    self.ops.append(RngOp(func, args[0], tuple(args[1:])))
                else:
                    self.unsupported.append(str(func))
            out = func(*args, **kwargs)
            if func in to_python and tainted_in:
                self.data_dependent = True
            if draws or tainted_in:
                outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
                if draws and args and isinstance(args[0], torch.Tensor):
                    outs.append(args[0])
                for o in outs:
                    key = storage_key(o)
                    if key is not None:
                        self._tainted.add(key)
            return out

    return Recorder()


def replay(torch: Any, ops: list[RngOp], state: bytes) -> bytes:
    """The generator state after drawing what `ops` drew, starting from `state`, on a private
    generator and one scratch buffer per dtype, viewed with each op's own sizes and strides (the
    CPU kernels pick their path, hence their draw count, from dtype, numel and contiguity)."""
    generator = torch.Generator(device="cpu")
    generator.set_state(state_tensor(torch, state))
    extent: dict[Any, int] = {}
    for op in ops:
        need = 1 + sum((s - 1) * st for s, st in zip(op.size, op.stride)) if op.numel() else 0
        extent[op.dtype] = max(extent.get(op.dtype, 0), need)
    scratch = {dt: torch.empty(n, dtype=dt) for dt, n in extent.items()}
    for op in ops:
        if op.numel():
            view = scratch[op.dtype].as_strided(op.size, op.stride)
            op.func(view, *op.args, generator=generator)
    return state_bytes(generator.get_state())


class GeneratorPlan:
    """How to leave the CPU generator where the recorded build left it, from any start state."""

    def __init__(
        self, torch: Any, recorder: Any, s0: bytes, s1: bytes, other_rng_changed: list[str]
    ) -> None:
        self.torch = torch
        self.s0, self.s1 = s0, s1  # the first build's start and end states
        self.ops: list[RngOp] = list(recorder.ops) if recorder is not None else []
        self.reasons = self._reasons_to_rebuild(recorder, other_rng_changed)
        self.words: int | None = None
        if not self.reasons:
            counts = [op_words(torch, op) for op in self.ops]
            if all(c is not None for c in counts):
                self.words = sum(c for c in counts if c is not None)
        self.mode: str | None = "rebuild" if self.reasons else None  # None: being decided
        self.check_seconds: float | None = None
        self._thread: threading.Thread | None = None
        self._prepared: dict[bytes, bytes] = {}  # start state -> end state (from "prepare")

    @staticmethod
    def _reasons_to_rebuild(recorder: Any, other_rng_changed: list[str]) -> list[str]:
        reasons = []
        if recorder is None:
            reasons.append("no TorchDispatchMode")
        else:
            if recorder.unsupported:
                reasons.append(f"unsupported RNG ops: {sorted(set(recorder.unsupported))}")
            if recorder.data_dependent:
                reasons.append("random data read back during the build")
        if other_rng_changed:
            reasons.append(f"build drew from python random/numpy: {other_rng_changed}")
        return reasons

    def decide(self) -> None:
        """Pick jump, replay or rebuild by checking each against the first build's real states.
        Jump is checked inline (~0.1 s); replay, only needed when jump does not apply, runs in a
        background thread (torch releases the GIL) and is joined at the next reuse."""
        if FORCED == "off":
            self.mode = "off"
        if self.mode is not None:
            return
        if FORCED == "rebuild":
            self.mode = "rebuild"
            return
        if self.words is not None and FORCED != "replay":
            started = time.perf_counter()
            try:
                ok = self._jump(self.s0) == self.s1
            except Exception:
                ok = False
            self.check_seconds = time.perf_counter() - started
            if ok:
                self.mode = "jump"
                return
        self._thread = threading.Thread(
            target=self._decide_replay, name="sd-rest-replay-check", daemon=True
        )
        self._thread.start()

    def _decide_replay(self) -> None:
        started = time.perf_counter()
        try:
            ok = replay(self.torch, self.ops, self.s0) == self.s1
        except Exception:
            ok = False
        self.check_seconds = time.perf_counter() - started
        self.mode = "replay" if ok else "rebuild"

    def _jump(self, state: bytes) -> bytes:
        import numpy as np  # the scripts imported it already (torch needs it for this)

        assert self.words is not None
        return MT_JUMP.advance(np, state, self.words)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def end_state(self, start: bytes) -> tuple[bytes | None, str]:
        """(end state, method); (None, "rebuild") when only a real build will do."""
        self.wait()
        if self.mode == "off":
            return start, "off"
        if start == self.s0:
            return self.s1, "same-seed"
        if start in self._prepared:
            return self._prepared[start], "prepared"
        if self.mode == "jump":
            return self._jump(start), "jump"
        if self.mode == "replay":
            return replay(self.torch, self.ops, start), "replay"
        return None, "rebuild"

    def prepare(self, start: bytes) -> None:
        """Background: compute the end state for a start state expected soon."""
        self.wait()
        if self.mode not in ("jump", "replay") or start in self._prepared or start == self.s0:
            return
        end = self._jump(start) if self.mode == "jump" else replay(self.torch, self.ops, start)
        if len(self._prepared) >= 16:
            self._prepared.pop(next(iter(self._prepared)))
        self._prepared[start] = end
