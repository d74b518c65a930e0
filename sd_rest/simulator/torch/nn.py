"""The stand-in for torch.nn: a Module with named tensors and submodules, a state dict, and
`load_state_dict` reporting missing and unexpected keys like the real one."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from torch import Tensor


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class Module:
    """Tensors and Modules assigned as attributes are registered, in assignment order."""

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Tensor):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def parameters(self) -> Iterator[Tensor]:
        for module in self.modules():
            yield from module._parameters.values()

    def state_dict(self) -> OrderedDict[str, Tensor]:
        """Every registered tensor by its dotted name (a shared submodule under each name)."""
        entries: OrderedDict[str, Tensor] = OrderedDict()
        for prefix, module in self.named_modules():
            for name, tensor in module._parameters.items():
                entries[f"{prefix}.{name}" if prefix else name] = tensor
        return entries

    def load_state_dict(
        self, state_dict: Mapping[str, Tensor], strict: bool = True
    ) -> IncompatibleKeys:
        own = self.state_dict()
        missing = [key for key in own if key not in state_dict]
        unexpected = [key for key in state_dict if key not in own]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        for key, tensor in own.items():
            if key in state_dict:
                tensor.copy_(state_dict[key])
        return IncompatibleKeys(missing, unexpected)

    def train(self, mode: bool = True) -> Module:
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def to(self, *args: Any, **kwargs: Any) -> Module:
        return self  # one device: the CPU
