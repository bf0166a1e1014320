"""Layout symbol -> sublayer module class. Modules register themselves with a decorator:

    @register_sublayer("M")
    class Mamba2Mixer(nn.Module): ...

Every registered class is built as `cls(cfg, d_model)` where `cfg` is the ModelConfig field for
that symbol, has `init_weights(std, out_std)` and `forward(x_BLD, ctx) -> (y_BLD, aux | None)`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hybrid.recipe.model_config import SUBLAYER_FIELD, ModelConfig

_SUBLAYERS: dict[str, type[nn.Module]] = {}


def register_sublayer(symbol: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    if symbol not in SUBLAYER_FIELD:
        raise ValueError(f"unknown layout symbol {symbol!r}")

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if symbol in _SUBLAYERS and _SUBLAYERS[symbol] is not cls:
            raise ValueError(f"symbol {symbol!r} already registered to {_SUBLAYERS[symbol]}")
        _SUBLAYERS[symbol] = cls
        return cls

    return wrap


def build_sublayer(symbol: str, cfg: ModelConfig) -> nn.Module:
    if symbol not in _SUBLAYERS:
        raise KeyError(f"no module registered for layout symbol {symbol!r}")
    return _SUBLAYERS[symbol](cfg.sublayer_config(symbol), cfg.d_model)


def registered_symbols() -> list[str]:
    return sorted(_SUBLAYERS)
