"""The stand-in for ldm/modules/ema.py: exponential-moving-average copies of a model's weights,
swapped in for sampling by `LatentDiffusion.ema_scope()`, with the real one's store, copy_to
and restore (sd-rest's resident worker repairs an interrupted swap through them)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn


class LitEma(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m_name2s_name: dict[str, str] = {}
        for name, tensor in model.state_dict().items():
            # Registered under the parameter's name without its dots, as the real one does.
            self.m_name2s_name[name] = name.replace(".", "")
            setattr(self, self.m_name2s_name[name], tensor.clone())
        self.collected_params: list[Tensor] = []

    def copy_to(self, model: nn.Module) -> None:
        for name, tensor in model.state_dict().items():
            tensor.copy_(getattr(self, self.m_name2s_name[name]))

    def store(self, parameters: Iterable[Tensor]) -> None:
        """Save the current weights, to be put back by restore()."""
        self.collected_params = [param.clone() for param in parameters]

    def restore(self, parameters: Iterable[Tensor]) -> None:
        for saved, param in zip(self.collected_params, parameters, strict=False):
            param.copy_(saved)
