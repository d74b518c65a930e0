"""The model a worker keeps between runs (``Resident``) and its first build: the real build
with its stdout copied (a reuse prints it again) and its generator draws recorded, from which
the plan that keeps the generator in step on a reuse is decided (generator.py).
"""

from __future__ import annotations

import io
import sys
from typing import Any, Callable, Tuple

from .generator import GeneratorPlan, make_recorder, state_bytes, state_tensor

# (real path, size, mtime_ns, inode, load options) of a torch.load (caches.checkpoint_key)
CheckpointKey = Tuple[str, int, int, int, str]


class Resident:
    """The one model kept between runs."""

    def __init__(
        self, key: str, model: Any, plan: GeneratorPlan, output: str, flags: list[Any]
    ) -> None:
        self.key = key
        self.model = model
        self.plan = plan
        self.output = output  # what the build printed, printed again on reuse (log parity)
        self.flags = flags  # [(module, training)] right after the build
        self.weights_from: CheckpointKey | None = None  # whose weights it holds exactly
        self.checkpoint: tuple[CheckpointKey, Any] | None = None  # aliased torch.load result
        parameters = getattr(model, "parameters", None)
        self.params = sum(p.numel() for p in parameters()) if parameters else 0


class _Tee:
    """sys.stdout during a build: writes through and keeps a copy. Not an io.TextIOBase: that
    would answer isatty()/fileno() itself instead of passing them to the real stream."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def build_resident(key: str, build: Callable[[Any], Any], config: Any) -> Resident:
    """`build(config)` (the real build), recorded, as the resident model keyed by `key`."""
    import torch

    s0 = state_bytes(torch.get_rng_state())
    other0 = _other_rng_states()
    tee = _Tee(sys.stdout)
    model, recorder = _build_watched(build, config, torch, s0, other0, tee)
    s1 = state_bytes(torch.get_rng_state())
    other1 = _other_rng_states()
    changed = [name for name in other0 if other0[name] != other1.get(name)]
    plan = GeneratorPlan(torch, recorder, s0, s1, changed)
    plan.decide()
    modules = getattr(model, "modules", None)
    flags = [(m, m.training) for m in modules()] if modules else []
    return Resident(key, model, plan, tee.copy.getvalue(), flags)


def _build_watched(
    build: Callable[[Any], Any],
    config: Any,
    torch: Any,
    s0: bytes,
    other0: dict[str, Any],
    tee: _Tee,
) -> tuple[Any, Any]:
    """(model, recorder or None): the real build, its stdout copied and, when torch has a
    TorchDispatchMode, its draws recorded."""
    recorder = make_recorder(torch)
    saved_stdout, sys.stdout = sys.stdout, tee
    try:
        if recorder is None:
            return build(config), None
        try:
            with recorder:
                return build(config), recorder
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception:
            # The recorder itself may be what failed: start again from the same generator
            # states without it (exactly what a run by hand does), and never reuse.
            torch.set_rng_state(state_tensor(torch, s0))
            _restore_other_rng_states(other0)
            return build(config), None
    finally:
        sys.stdout = saved_stdout


def _other_rng_states() -> dict[str, Any]:
    """Python's and numpy's generators: a build must not draw from them (if it does, only a
    real rebuild keeps them in step)."""
    import random

    states: dict[str, Any] = {"random": random.getstate()}
    np = sys.modules.get("numpy")
    if np is not None:
        s = np.random.get_state()
        states["numpy"] = (s[0], s[1].tobytes(), s[2], s[3], s[4])
    return states


def _restore_other_rng_states(states: dict[str, Any]) -> None:
    import random

    random.setstate(states["random"])
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in states:
        s = states["numpy"]
        words = np.frombuffer(s[1], dtype=np.uint32).copy()
        np.random.set_state((s[0], words, s[2], s[3], s[4]))
