"""The simulator's stand-in for PyTorch. It is NOT torch.

The simulator repository has no real torch; this small package sits at its root so that the
simulated scripts go through the same calls as the real ones, and so that what the server
does around them works here too:

* a default CPU random generator (Mersenne Twister, like torch's) with `manual_seed`,
  `initial_seed`, `get_rng_state`/`set_rng_state` and `Generator` objects: a seeding
  `sitecustomize.py` (`import torch; torch.manual_seed(n)`) seeds it; a model's random
  initialisation and the sampler's noise draw from it, in that order, as in the real scripts;
* `torch.load`, which reads a checkpoint (any file) into a state dict whose weights come from
  the file's bytes, and fails like the real one on a missing file;
* `Tensor` and `nn.Module`: just what the simulated models, and sd-rest's resident worker
  (which caches `torch.load` results and models), use.
"""

from __future__ import annotations

import array
import hashlib
import os
import random
import struct
import time
from collections.abc import Sequence
from typing import Any

import simknobs

# Real torch also starts from a fixed seed when nobody seeds it; any fixed number will do.
DEFAULT_SEED = 67280421310721

# What a checkpoint holds: one small tensor per network of the simulated models, named as the
# models' state dicts name them (the configs give the networks these sizes), and inpaint's EMA
# copy of its UNet. A model takes the entries it has; the others are unexpected keys, as the
# real scripts' strict=False allows.
CHECKPOINT_TENSORS = {
    "model.diffusion_model.weight": 64,
    "model_ema.diffusion_modelweight": 64,
    "first_stage_model.weight": 16,
    "cond_stage_model.weight": 16,
}
# inpaint's conditioning stage is its first stage: a checkpoint saved from it holds the same
# values under both names.
SAME_VALUES_AS = {"cond_stage_model.weight": "first_stage_model.weight"}
CHECKPOINT_DIGEST_BYTES = 1 << 20  # the weights come from the file's first MiB and its size


class dtype:  # torch's spelling
    def __init__(self, name: str, typecode: str, is_floating_point: bool) -> None:
        self.name = name
        self.typecode = typecode  # the array module's type code of the values
        self.is_floating_point = is_floating_point

    def __repr__(self) -> str:
        return f"torch.{self.name}"


float32 = dtype("float32", "f", True)
float64 = dtype("float64", "d", True)
uint8 = dtype("uint8", "B", False)


def _shape(size: tuple[Any, ...]) -> tuple[int, ...]:
    """rand(2, 3) and rand([2, 3]) alike."""
    if len(size) == 1 and isinstance(size[0], Sequence):
        size = tuple(size[0])
    return tuple(int(s) for s in size)


def _count(shape: Sequence[int]) -> int:
    n = 1
    for side in shape:
        n *= side
    return n


class Tensor:
    """A flat array of values and a shape: enough for checkpoints, weights and noise."""

    def __init__(self, values: array.array[Any], shape: Sequence[int], dtype: dtype) -> None:
        if len(values) != _count(shape):
            raise RuntimeError(f"shape {list(shape)} is invalid for input of size {len(values)}")
        self._values = values
        self.shape = tuple(shape)
        self.dtype = dtype

    def numel(self) -> int:
        return len(self._values)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        """The index-th slice along the first dimension (a copy)."""
        if not 0 <= index < self.shape[0]:
            size = self.shape[0]
            raise IndexError(f"index {index} is out of bounds for dimension 0 with size {size}")
        rest = self.shape[1:]
        n = _count(rest)
        return Tensor(self._values[index * n : (index + 1) * n], rest, self.dtype)

    def numpy(self) -> array.array[Any]:
        """The values; the real one returns an ndarray, this an array with the same tobytes()."""
        return array.array(self._values.typecode, self._values)

    def cpu(self) -> Tensor:
        return self

    def to(self, *args: Any, **kwargs: Any) -> Tensor:
        """Devices are ignored; a dtype converts."""
        target = kwargs.get("dtype") or next((a for a in args if isinstance(a, dtype)), None)
        if target is None or target is self.dtype:
            return self
        return Tensor(array.array(target.typecode, self._values), self.shape, target)

    def copy_(self, source: Tensor) -> Tensor:
        if source is not self:  # like torch, copying a tensor onto itself does nothing
            if source.shape != self.shape:
                raise RuntimeError(f"size mismatch: {source.shape} into {self.shape}")
            self._values[:] = array.array(self._values.typecode, source._values)
        return self

    def clone(self) -> Tensor:
        return Tensor(self.numpy(), self.shape, self.dtype)

    def data_ptr(self) -> int:
        return self._values.buffer_info()[0]

    def __repr__(self) -> str:
        return f"tensor(shape={list(self.shape)}, dtype={self.dtype!r})"


def equal(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and list(a._values) == list(b._values)


def empty(*size: Any, dtype: dtype = float32) -> Tensor:
    shape = _shape(size)
    return Tensor(array.array(dtype.typecode, [0] * _count(shape)), shape, dtype)


def frombuffer(buffer: bytes | bytearray, dtype: dtype = uint8) -> Tensor:
    values = array.array(dtype.typecode, bytes(buffer))
    return Tensor(values, (len(values),), dtype)


# --- the random generator ----------------------------------------------------------------

_STATE_HEAD = struct.Struct("<QBd")  # the seed, whether a normal value is cached, that value
_STATE_WORDS = struct.Struct("<625I")  # the Mersenne Twister's 624 words and its position


class Generator:
    """A Mersenne Twister (Python's), seeded and serialized like torch's CPU generator."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._random = random.Random()
        self.manual_seed(DEFAULT_SEED)

    def manual_seed(self, seed: int) -> Generator:
        """Wraps to 64 bits like torch does."""
        self._seed = int(seed) % 2**64
        self._random.seed(self._seed)
        return self

    def initial_seed(self) -> int:
        return self._seed

    def get_state(self) -> Tensor:
        _, words, cached = self._random.getstate()
        head = _STATE_HEAD.pack(self._seed, cached is not None, cached or 0.0)
        return frombuffer(head + _STATE_WORDS.pack(*words))

    def set_state(self, state: Tensor) -> Generator:
        data = state.numpy().tobytes()
        if len(data) != _STATE_HEAD.size + _STATE_WORDS.size:
            raise RuntimeError("Invalid mt19937 state")
        seed, has_cached, cached = _STATE_HEAD.unpack_from(data)
        words = _STATE_WORDS.unpack_from(data, _STATE_HEAD.size)
        self._random.setstate((3, words, cached if has_cached else None))
        self._seed = seed
        return self

    def uniform(self, n: int) -> list[float]:
        return [self._random.random() for _ in range(n)]

    def normal(self, n: int) -> list[float]:
        return [self._random.gauss(0.0, 1.0) for _ in range(n)]


default_generator = Generator()


def manual_seed(seed: int) -> Generator:
    return default_generator.manual_seed(seed)


def initial_seed() -> int:
    return default_generator.initial_seed()


def get_rng_state() -> Tensor:
    return default_generator.get_state()


def set_rng_state(new_state: Tensor) -> None:
    default_generator.set_state(new_state)


def rand(*size: Any, generator: Generator | None = None) -> Tensor:
    """Uniform values in [0, 1), drawn from `generator` (default: the default generator)."""
    shape = _shape(size)
    values = (generator or default_generator).uniform(_count(shape))
    return Tensor(array.array("f", values), shape, float32)


def randn(*size: Any, generator: Generator | None = None) -> Tensor:
    """Standard normal values, drawn from `generator` (default: the default generator)."""
    shape = _shape(size)
    values = (generator or default_generator).normal(_count(shape))
    return Tensor(array.array("f", values), shape, float32)


def randn_like(tensor: Tensor) -> Tensor:
    return randn(tensor.shape)


# --- checkpoints -------------------------------------------------------------------------


def load(f: str | os.PathLike[str], map_location: Any = None) -> dict[str, Any]:
    """Read a checkpoint: a missing file raises FileNotFoundError as torch.load does. Any file
    will do: its bytes become the weights (see CHECKPOINT_TENSORS)."""
    time.sleep(simknobs.knobs().load_seconds)  # reading gigabytes, before the file is opened
    with open(f, "rb") as checkpoint:
        digest = hashlib.sha256(checkpoint.read(CHECKPOINT_DIGEST_BYTES))
        digest.update(str(os.fstat(checkpoint.fileno()).st_size).encode())
    simknobs.event("checkpoint", path=os.path.abspath(f))
    return {"global_step": 470000, "state_dict": _weights_from(digest.digest())}


def _weights_from(digest: bytes) -> dict[str, Tensor]:
    state_dict = {}
    for name, size in CHECKPOINT_TENSORS.items():
        source = SAME_VALUES_AS.get(name, name)
        draw = random.Random(digest + source.encode()).random
        values = array.array("f", [draw() for _ in range(size)])
        state_dict[name] = Tensor(values, (size,), float32)
    return state_dict


from torch import nn  # noqa: E402 - nn needs Tensor, as real torch's does

__all__ = ["nn"]  # and the names above
