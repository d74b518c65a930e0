"""The patches that route the scripts' expensive calls through the caches.

The driver imports none of these modules itself: each patch is applied right after the module
is first imported (by a script), through a meta-path finder that wraps the module's loader.

  torch                    torch.load (cache); nn.Module.load_state_dict (which checkpoint
                           a cached model holds)
  ldm.util                 instantiate_from_config: the one entry point for model builds.
                           txt2img/img2img bind it from ldm.util; inpaint's
                           ``from main import instantiate_from_config`` gets the same wrapped
                           function, since main.py imports it from ldm.util after the patch;
                           ldm's own nested calls get it too (and pass through).
  diffusers...safety_checker, transformers...feature_extraction_auto
                           from_pretrained of those two classes only (txt2img's module level)
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from typing import Any, Callable

from .caches import CACHES


def _patch_torch(torch: Any) -> None:
    real_load = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        return CACHES.torch_load(real_load, f, args, kwargs)

    load.__wrapped__ = real_load  # type: ignore[attr-defined]
    load.__doc__ = real_load.__doc__
    torch.load = load

    module_class = torch.nn.Module
    real_load_state_dict = module_class.load_state_dict

    def load_state_dict(self: Any, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        return CACHES.load_state_dict(real_load_state_dict, self, state_dict, args, kwargs)

    load_state_dict.__wrapped__ = real_load_state_dict  # type: ignore[attr-defined]
    module_class.load_state_dict = load_state_dict


def _patch_ldm_util(module: Any) -> None:
    real = module.instantiate_from_config
    if getattr(real, "_sd_rest_wrapped", False):
        return

    def instantiate_from_config(config: Any) -> Any:
        return CACHES.instantiate(real, config)

    instantiate_from_config._sd_rest_wrapped = True  # type: ignore[attr-defined]
    instantiate_from_config.__wrapped__ = real  # type: ignore[attr-defined]
    module.instantiate_from_config = instantiate_from_config


def _patch_from_pretrained(cls: Any) -> None:
    real = cls.from_pretrained.__func__  # the classmethod's function (possibly inherited)

    def from_pretrained(klass: Any, *args: Any, **kwargs: Any) -> Any:
        if klass is not cls:  # a subclass: not what the scripts load
            return real(klass, *args, **kwargs)
        return CACHES.from_pretrained(real, klass, args, kwargs)

    cls.from_pretrained = classmethod(from_pretrained)


def _patch_safety_checker(module: Any) -> None:
    _patch_from_pretrained(module.StableDiffusionSafetyChecker)


def _patch_feature_extraction_auto(module: Any) -> None:
    _patch_from_pretrained(module.AutoFeatureExtractor)


PATCHES: dict[str, Callable[[Any], None]] = {
    "torch": _patch_torch,
    "ldm.util": _patch_ldm_util,
    "diffusers.pipelines.stable_diffusion.safety_checker": _patch_safety_checker,
    "transformers.models.auto.feature_extraction_auto": _patch_feature_extraction_auto,
}


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, then the patch."""

    def __init__(self, loader: Any, patch: Callable[[Any], None]) -> None:
        self._loader, self._patch = loader, patch

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds the patched modules through the other finders and wraps their loaders."""

    def __init__(self) -> None:
        # Names being resolved, per thread: other wrapping finders (the kit's
        # bfirsh_sd_cpu_compat) ask every finder too, us included, which would recurse.
        self._resolving = threading.local()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        patch = PATCHES.get(fullname)
        names = getattr(self._resolving, "names", None)
        if names is None:
            names = self._resolving.names = set()
        if patch is None or fullname in names:
            return None
        names.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None:
                        spec.loader = _PatchingLoader(spec.loader, patch)
                    return spec
            return None
        finally:
            names.discard(fullname)


def install() -> None:
    """Patch what is imported already (e.g. by a .pth file), and what will be, as it is."""
    for name, patch in PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    sys.meta_path.insert(0, _PatchingFinder())
