"""The target registry and the pieces every Hugging Face adapter shares.

A target is one Hugging Face model class. Its adapter (one file under `hybrid/convert/targets/`)
says which of our models it represents *exactly* (`mismatches`: an empty list, or one line per
semantic difference that would change the logits), builds the HF config, and maps the state
dict both ways between our canonical names and the HF checkpoint's names (the names HF writes
with `save_pretrained`, i.e. the published checkpoints' names):

    to_hf(StateReader of our canonical state, cfg)          -> {hf name: tensor}
    from_hf(StateReader of the HF checkpoint, hf_cfg, cfg)  -> {our canonical name: tensor}

Both directions read through a `StateReader`, which fails when a tensor is missing and, at the
end, when one was never used: a conversion cannot silently drop weights.

Targets register themselves with `@register_target`; the registration order is the preference
order when the user does not force one with `--target`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError, from_dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportSpec:
    """What an HF config needs besides the model: special token ids and the context length."""

    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    max_position_embeddings: int = 4096


class StateReader:
    """A state dict consumed key by key, so that a conversion can prove it used every tensor.

    `what` names the source in error messages (e.g. "checkpoint runs/x" or "HF model out/").
    """

    def __init__(self, state: Mapping[str, Tensor], what: str) -> None:
        self._state = dict(state)
        self._used: set[str] = set()
        self.what = what

    def __contains__(self, key: str) -> bool:
        return key in self._state

    def names(self) -> list[str]:
        return list(self._state)

    def take(self, key: str) -> Tensor:
        """The tensor `key`, marked as used; ConfigError when it is missing."""
        if key not in self._state:
            raise ConfigError(f"{self.what}: tensor {key!r} is missing")
        self._used.add(key)
        return self._state[key]

    def skip(self, key: str) -> None:
        """Mark `key` as deliberately not converted (the caller logs why)."""
        self._used.add(key)

    def finish(self) -> None:
        """ConfigError when some tensor was never used."""
        left = sorted(set(self._state) - self._used)
        if left:
            shown = ", ".join(left[:4]) + (", ..." if len(left) > 4 else "")
            raise ConfigError(
                f"{self.what}: {len(left)} tensors have no place in the converted model ({shown})"
            )


class Target(ABC):
    """One Hugging Face model class and the exact mapping of our models onto it."""

    name: ClassVar[str]  # the --target name
    model_type: ClassVar[str]  # config.json "model_type"
    architecture: ClassVar[str]  # the transformers class
    remote_code: ClassVar[bool] = False  # needs trust_remote_code=True to load

    @abstractmethod
    def mismatches(self, cfg: ModelConfig) -> list[str]:
        """Why this class cannot represent `cfg` exactly (empty when it can)."""

    @abstractmethod
    def hf_config(self, cfg: ModelConfig, spec: ExportSpec) -> Any:
        """The transformers config object of `cfg` (only called when `mismatches` is empty)."""

    @abstractmethod
    def to_hf(self, state: StateReader, cfg: ModelConfig) -> dict[str, Tensor]:
        """Our canonical state dict -> the HF checkpoint's tensors."""

    @abstractmethod
    def model_config(self, hf_cfg: Any) -> ModelConfig:
        """Our model config for an HF config; ConfigError naming what cannot be represented."""

    @abstractmethod
    def from_hf(self, state: StateReader, hf_cfg: Any, cfg: ModelConfig) -> dict[str, Tensor]:
        """The HF checkpoint's tensors -> our canonical state dict for `cfg`."""

    def extra_files(self) -> dict[str, str]:
        """File name -> text of extra files written next to the weights (remote code)."""
        return {}


TARGETS: dict[str, Target] = {}


def register_target(cls: type[Target]) -> type[Target]:
    """Class decorator: register one instance of `cls` under `cls.name`."""
    if cls.name in TARGETS:
        raise ValueError(f"target {cls.name!r} registered twice")
    TARGETS[cls.name] = cls()
    return cls


def all_targets() -> dict[str, Target]:
    """Every registered target, in preference order (importing the adapters registers them)."""
    import hybrid.convert.targets  # noqa: F401

    return TARGETS


def target_for_model_type(model_type: str) -> Target:
    """The target whose HF config has `model_type`; ConfigError naming the supported ones."""
    for target in all_targets().values():
        if target.model_type == model_type:
            return target
    known = ", ".join(sorted(t.model_type for t in TARGETS.values()))
    raise ConfigError(
        f"model_type {model_type!r} is not a class `hybrid convert from-hf` reads (known: {known})"
    )


def model_config_from_dict(data: dict, source: str) -> ModelConfig:
    """`ModelConfig` from a derived dict; a ConfigError names the HF config it came from."""
    try:
        return from_dict(ModelConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{source}: gives a model hybrid cannot build: {err}") from None


def rounded(value: float) -> float:
    """A float derived by arithmetic from config values, rounded to 12 significant digits
    (so 1e-5 / sqrt(10)**2 reads back as 1e-06)."""
    return float(f"{value:.12g}")
