"""What the worker keeps between runs, and the rules for reusing it.

* The model: one at a time, built by the top-level ``instantiate_from_config`` of a run and
  keyed by the sha256 of the config's resolved content. It is reused only while it holds exactly
  a checkpoint's weights: ``weights_from`` is cleared when a ``load_state_dict`` into it starts
  and set when a load of a tracked ``torch.load`` result finishes with no missing keys (with
  strict=False a missing key would keep the first build's random initialisation, which depends
  on that build's seed). A run that ends with ``weights_from`` empty evicts the model.
* The checkpoint: the ``torch.load`` result keyed by (real path, size, mtime, inode, load
  options), its state_dict tensors replaced by the model's own after each run, so the cache
  holds no second copy of the weights (the script's next ``load_state_dict`` then copies each
  tensor onto itself, which torch skips).
* ``from_pretrained`` results of the safety checker and its feature extractor.

The model kept and its first build, recorded, are in resident.py.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import sys
from typing import Any, Callable, Dict, Tuple

from . import ALIAS_ENV
from .generator import state_bytes, state_tensor
from .memory import collect_garbage, release_device_memory
from .resident import CheckpointKey, Resident, build_resident

# Diagnostic switch: SD_REST_WORKER_ALIAS=0 keeps the cached torch.load result as read instead of
# pointing its tensors at the model's (costs a second copy of the weights).
ALIAS_CHECKPOINT = os.environ.get(ALIAS_ENV, "1") != "0"

# (checkpoint key, what torch.load returned, the state dict inside it)
Loaded = Tuple[CheckpointKey, Any, Dict[str, Any]]


class JobCache:
    """What one run did with the caches (its "finished" event reports it)."""

    def __init__(self) -> None:
        self.model: str | None = None  # "hit" | "built"
        self.generator: str | None = None  # how the generator was kept in step on a hit
        self.checkpoint: str | None = None  # "hit" | "read"
        self.evicted = False
        self.handed_out = False  # the resident model was given to this run
        self.loaded: dict[int, Loaded] = {}  # id(state dict) -> its torch.load, this run
        self.pending_alias: Loaded | None = None  # fully loaded into the model

    def report(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "generator": self.generator,
            "checkpoint": self.checkpoint,
            "evicted": self.evicted,
        }


def checkpoint_key(f: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CheckpointKey | None:
    """(real path, size, mtime_ns, inode, load options) for a path argument, else None (an
    open file or a buffer is never cached)."""
    if isinstance(f, bytes):
        f = os.fsdecode(f)
    if not isinstance(f, (str, os.PathLike)):
        return None
    try:
        real = os.path.realpath(os.fspath(f))
        st = os.stat(real)
        options = repr((args, sorted(kwargs.items())))
    except Exception:
        return None
    return (real, st.st_size, st.st_mtime_ns, st.st_ino, options)


def config_key(config: Any) -> str | None:
    """sha256 of the config's resolved content, or None if it cannot be serialized."""
    try:
        omegaconf = sys.modules.get("omegaconf")
        if omegaconf is not None and isinstance(config, omegaconf.DictConfig):
            data = omegaconf.OmegaConf.to_container(config, resolve=True)
        else:
            data = config
        text = json.dumps(data, sort_keys=True, default=repr)
    except Exception:
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def pretrained_key(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The class, the arguments and, for a local folder, its listing (a replaced file is read
    again); a hub id is keyed by the id only."""
    try:
        ident = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        listing = None
        if isinstance(ident, (str, os.PathLike)) and os.path.isdir(ident):
            real = os.path.realpath(ident)
            listing = (
                real,
                sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(real)),
            )
        return repr((cls.__module__, cls.__qualname__, args, sorted(kwargs.items()), listing))
    except Exception:
        return None


class Caches:
    def __init__(self) -> None:
        self.resident: Resident | None = None
        self.job: JobCache | None = None  # the run in progress, if any
        self.build_depth = 0  # > 0 inside a model build: nested calls pass straight through
        self.pretrained: dict[str, Any] = {}

    def start_job(self) -> JobCache:
        self.job = JobCache()
        return self.job

    # -- the model ----------------------------------------------------------------------------

    def instantiate(self, real: Callable[[Any], Any], config: Any) -> Any:
        """A run's top-level instantiate_from_config: the resident model when it fits."""
        if self.job is None or self.build_depth:
            return self._build_plain(real, config)
        key = config_key(config)
        res = self.resident
        if key is not None and res is not None and res.key == key and res.weights_from:
            return self._reuse(real, config, res)
        if res is not None:
            self.evict()
        if key is None:
            return self._build_plain(real, config)
        return self._build_recorded(real, config, key)

    def _build_plain(self, real: Callable[[Any], Any], config: Any) -> Any:
        self.build_depth += 1
        try:
            return real(config)
        finally:
            self.build_depth -= 1

    def _build_recorded(self, real: Callable[[Any], Any], config: Any, key: str) -> Any:
        assert self.job is not None
        self.resident = build_resident(key, functools.partial(self._build_plain, real), config)
        self.job.model = "built"
        self.job.handed_out = True
        return self.resident.model

    def _reuse(self, real: Callable[[Any], Any], config: Any, res: Resident) -> Any:
        import torch

        assert self.job is not None
        start = state_bytes(torch.get_rng_state())
        end, how = res.plan.end_state(start)
        if end is None:
            # last resort: the real constructor again, result dropped (it prints as it builds)
            self._build_plain(real, config)
        else:
            torch.set_rng_state(state_tensor(torch, end))
            sys.stdout.write(res.output)
        for module, training in res.flags:
            module.training = training
        self.job.model, self.job.generator, self.job.handed_out = "hit", how, True
        return res.model

    def evict(self) -> None:
        if self.resident is not None:
            self.resident = None
            if self.job is not None:
                self.job.evicted = True
            collect_garbage(full=True)
            release_device_memory()

    # -- torch.load and load_state_dict ---------------------------------------------------------

    def torch_load(
        self, real: Callable[..., Any], f: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        job, res = self.job, self.resident
        key = checkpoint_key(f, args, kwargs) if job is not None and not self.build_depth else None
        if key is None or job is None:
            return real(f, *args, **kwargs)
        if (
            res is not None
            and res.checkpoint is not None
            and res.weights_from == key
            and res.checkpoint[0] == key
        ):
            container = copy_container(res.checkpoint[1])
            job.checkpoint = "hit"
        else:
            container = real(f, *args, **kwargs)
            job.checkpoint = "read"
        self._note_loaded(job, key, container)
        return container

    @staticmethod
    def _note_loaded(job: JobCache, key: CheckpointKey, container: Any) -> None:
        """Remember the state dict inside, so a load_state_dict of it can be traced back."""
        sd = container.get("state_dict") if isinstance(container, dict) else None
        if isinstance(sd, dict):
            job.loaded[id(sd)] = (key, container, sd)
        elif isinstance(container, dict):
            job.loaded[id(container)] = (key, container, container)

    def load_state_dict(
        self,
        real: Callable[..., Any],
        module: Any,
        state_dict: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        res, job = self.resident, self.job
        if res is None or job is None or module is not res.model:
            return real(module, state_dict, *args, **kwargs)
        origin = job.loaded.get(id(state_dict))
        res.weights_from = None  # until this load completes
        job.pending_alias = None
        result = real(module, state_dict, *args, **kwargs)
        missing = getattr(result, "missing_keys", None)
        if missing is None and isinstance(result, tuple):
            missing = result[0]
        if origin is not None and not missing:
            res.weights_from = origin[0]
            job.pending_alias = origin
        return result

    # -- from_pretrained (the safety checker, its feature extractor) ----------------------------

    def from_pretrained(
        self, real: Callable[..., Any], cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self.build_depth or self.job is None:
            return real(cls, *args, **kwargs)
        key = pretrained_key(cls, args, kwargs)
        if key is None:
            return real(cls, *args, **kwargs)
        if key not in self.pretrained:
            self.pretrained[key] = real(cls, *args, **kwargs)
        return self.pretrained[key]

    # -- the end of a run -----------------------------------------------------------------------

    def end_job(self, ok: bool) -> None:
        """Repair and keep what the run left (or evict it); called before the run's state is
        restored."""
        job, res = self.job, self.resident
        self.job = None
        if res is None or job is None:
            return
        if job.handed_out:
            repair_ema(res.model, ok)
            if res.weights_from is None:
                # built here and never (completely) loaded, or a load was cut short
                self.evict()
            elif job.pending_alias is not None and job.pending_alias[0] == res.weights_from:
                res.checkpoint = (res.weights_from, self._kept_checkpoint(res, job.pending_alias))
            elif res.checkpoint is not None and res.checkpoint[0] != res.weights_from:
                res.checkpoint = None
        job.loaded.clear()
        job.pending_alias = None

    @staticmethod
    def _kept_checkpoint(res: Resident, loaded: Loaded) -> Any:
        if ALIAS_CHECKPOINT:
            return alias_container(res.model, loaded)
        return loaded[1]  # diagnostic: as read (a second copy of the weights)


def copy_container(container: Any) -> Any:
    """A fresh top-level dict (and state_dict dict) around the same tensors, so that a script
    that pops or adds keys cannot damage the cached copy."""
    if not isinstance(container, dict):
        return container
    # copy.copy keeps the OrderedDict type and its `_metadata` (per-module versions that
    # load_state_dict passes to _load_from_state_dict, which may convert legacy layouts)
    out = copy.copy(container)
    if isinstance(out.get("state_dict"), dict):
        out["state_dict"] = copy.copy(out["state_dict"])
    return out


def alias_container(model: Any, loaded: Loaded) -> Any:
    """The torch.load result with every state_dict tensor the model holds replaced by the model's
    own tensor (same values, no second copy). Entries the model does not have (unexpected keys,
    ignored by load_state_dict(strict=False)) become empty tensors of their dtype."""
    import torch

    _, container, sd = loaded
    own = model.state_dict()
    new_sd = copy.copy(sd)  # same type, order and `_metadata` as what torch.load returned
    for name, value in sd.items():
        mine = own.get(name)
        if mine is not None and isinstance(value, torch.Tensor) and mine.shape == value.shape:
            new_sd[name] = mine
        elif isinstance(value, torch.Tensor):
            new_sd[name] = torch.empty(0, dtype=value.dtype)
    if container is sd:
        return new_sd
    out = copy.copy(container)
    out["state_dict"] = new_sd
    return out


def repair_ema(model: Any, ok: bool) -> None:
    """ldm's ema_scope() stores the weights, copies the EMA weights in, and restores in a
    `finally`. An interrupt can land before its `try` or cut a copy short, leaving EMA (or mixed)
    weights in the cached model. LitEma.store() assigns collected_params only once its clones are
    complete, so restoring from non-empty collected_params after a failed run is always right.
    Clearing them after every run also frees the clones (a full copy of the UNet) that ldm
    otherwise keeps until the next store()."""
    ema = getattr(model, "model_ema", None)
    inner = getattr(model, "model", None)
    if ema is None or inner is None or not hasattr(ema, "collected_params"):
        return
    if ema.collected_params and not ok:
        ema.restore(inner.parameters())
    ema.collected_params = []


CACHES = Caches()


def resident_summary() -> list[dict[str, Any]]:
    """The resident model as "status" reports it (a list: room for more than one later)."""
    res = CACHES.resident
    if res is None:
        return []
    plan = res.plan
    return [
        {
            "config": res.key[:12],
            "checkpoint": res.weights_from[0] if res.weights_from else None,
            "generator": plan.mode,
            "params": res.params,
            "generator_words": plan.words,
            "generator_check_s": plan.check_seconds,
            "generator_reasons": plan.reasons,
        }
    ]


def check_resident() -> tuple[bool, str]:
    """Test aid: do the resident model's weights equal its checkpoint's, bit for bit, with no
    EMA clones kept and the cached checkpoint sharing the model's tensors?"""
    res = CACHES.resident
    if res is None or res.weights_from is None:
        return True, "no resident model"
    import torch

    path = res.weights_from[0]
    fresh = torch.load.__wrapped__(path, map_location="cpu")
    sd = fresh.get("state_dict", fresh)
    own = res.model.state_dict()
    bad = [
        name
        for name, value in sd.items()
        if name in own and not torch.equal(own[name].cpu(), value.to(own[name].dtype))
    ]
    ema = getattr(res.model, "model_ema", None)
    pending = len(getattr(ema, "collected_params", []) or [])
    shared = 0
    if res.checkpoint is not None:
        cached = res.checkpoint[1]
        cached = cached.get("state_dict", cached) if isinstance(cached, dict) else {}
        shared = sum(1 for k, v in cached.items() if k in own and v.data_ptr() == own[k].data_ptr())
        if getattr(cached, "_metadata", None) != getattr(sd, "_metadata", None):
            bad.append("<state_dict _metadata lost>")
    detail = (
        f"{len(sd)} tensors compared, {len(bad)} differ {bad[:5]}; ema clones kept: {pending}; "
        f"cached checkpoint tensors sharing the model's storage: {shared}"
    )
    return not bad and not pending, detail
