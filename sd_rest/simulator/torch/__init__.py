"""The simulator's stand-in for PyTorch. It is NOT torch.

The simulator repository has no real torch; this tiny package sits at its root so that
what the server does to seed a script (a sitecustomize module running
`import torch; torch.manual_seed(seed)` at interpreter start) works here too, and so that
the simulated scripts load checkpoints through a `torch.load` that fails like the real one.
Only the few calls the simulator needs exist.
"""

from __future__ import annotations

import os
from typing import Any

# Real torch also starts from a fixed seed when nobody seeds it; any fixed number will do.
DEFAULT_SEED = 67280421310721

_seed = DEFAULT_SEED


def manual_seed(seed: int) -> None:
    """Set the seed that initial_seed() reports; wraps to 64 bits like torch does."""
    global _seed
    _seed = int(seed) % 2**64


def initial_seed() -> int:
    return _seed


def load(f: str | os.PathLike[str], map_location: Any = None) -> dict[str, Any]:
    """Open the checkpoint (so a missing file raises FileNotFoundError as torch.load does)
    and return what a Stable Diffusion v1 checkpoint holds, minus the weights."""
    with open(f, "rb"):
        pass
    return {"global_step": 470000, "state_dict": {}}
