"""The simulator's stand-in for OmegaConf: `OmegaConf.load` of the simulator's two configs.

It reads the part of YAML those files use (nested mappings by indentation, scalars, flow
lists, comments) into a `DictConfig`, a dict whose keys are also attributes (`config.model`),
and fails like the real one on a missing file.
"""

from __future__ import annotations

import ast
import os
from typing import Any


class DictConfig(dict[str, Any]):
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(item) for item in text[1:-1].split(",") if item.strip()]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "~", ""):
        return None
    try:
        return ast.literal_eval(text)  # numbers and quoted strings
    except (ValueError, SyntaxError):
        return text


def _lines(text: str) -> list[tuple[int, str]]:
    """(indentation, content) of each line that holds more than a comment."""
    out = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.strip():
            out.append((len(line) - len(line.lstrip(" ")), line.strip()))
    return out


def _mapping(lines: list[tuple[int, str]], start: int, indent: int) -> tuple[DictConfig, int]:
    node = DictConfig()
    i = start
    while i < len(lines) and lines[i][0] == indent:
        key, _, value = lines[i][1].partition(":")
        i += 1
        if value.strip() or i == len(lines) or lines[i][0] <= indent:
            node[key.strip()] = _scalar(value)
        else:
            node[key.strip()], i = _mapping(lines, i, lines[i][0])
    return node, i


class OmegaConf:
    @staticmethod
    def load(path: str | os.PathLike[str]) -> DictConfig:
        with open(path, encoding="utf-8") as config:
            lines = _lines(config.read())
        node, _ = _mapping(lines, 0, lines[0][0] if lines else 0)
        return node

    @staticmethod
    def to_container(config: Any, resolve: bool = False) -> Any:
        """Plain dicts and lists (nothing to resolve: the simulator's configs interpolate
        nothing)."""
        if isinstance(config, dict):
            return {key: OmegaConf.to_container(value) for key, value in config.items()}
        if isinstance(config, list):
            return [OmegaConf.to_container(value) for value in config]
        return config
