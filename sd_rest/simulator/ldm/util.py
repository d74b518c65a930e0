"""The stand-in for the repository's ldm/util.py: building objects from config entries.

As in the real repository, the scripts build their model with `instantiate_from_config`, and
the model's constructor builds its networks with nested calls of it.
"""

from __future__ import annotations

import importlib
from typing import Any


def instantiate_from_config(config: Any) -> Any:
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**config.get("params", {}))


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    module, cls = string.rsplit(".", 1)
    if reload:
        importlib.reload(importlib.import_module(module))
    return getattr(importlib.import_module(module, package=None), cls)
