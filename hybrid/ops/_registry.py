"""Implementation registry of `hybrid.ops`.

Each operation is an `Op` holding named implementations (`Impl`): a function, a
`supports(device) -> bool` predicate and a priority. All implementations of one op take the same
arguments. `Op.select(device, requested)` picks one:

1. `requested` (the `impl=` argument of a public op), when given;
2. else the one named for this op in the environment variable `HYBRID_OPS_IMPL`;
3. else the highest-priority implementation that supports the device and is meant to be chosen
   automatically there (`auto`, default: `supports`), logged once per op and device type.
   The Triton kernels, for example, support CPU tensors under the Triton interpreter
   (TRITON_INTERPRET=1, for tests) but are chosen automatically only on CUDA.

A requested or forced implementation that is unknown or does not support the device raises
`ValueError`; nothing falls back silently.

`HYBRID_OPS_IMPL` is a comma-separated list of `op=impl` pairs, e.g.
`ssd=torch,gated_rmsnorm=torch`; a bare name (`torch`) forces that implementation for every op.

The only module state is the table of ops (`_OPS`) and the set of (op, device type) choices
already logged (`_LOGGED`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

ENV_VAR = "HYBRID_OPS_IMPL"

_OPS: dict[str, Op] = {}
_LOGGED: set[tuple[str, str]] = set()


def any_device(device: torch.device) -> bool:
    """`supports` predicate for implementations written in plain PyTorch."""
    return True


@dataclass(frozen=True)
class Impl:
    """One implementation of an op."""

    name: str
    fn: Callable[..., Any]
    supports: Callable[[torch.device], bool]
    priority: int
    auto: Callable[[torch.device], bool] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any

    def chosen_automatically(self, device: torch.device) -> bool:
        return self.supports(device) and (self.auto is None or self.auto(device))

    def takes(self, dtype: torch.dtype | None) -> bool:
        return dtype is None or self.dtypes is None or dtype in self.dtypes


class Op:
    """A named operation with its implementations (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._impls: dict[str, Impl] = {}

    def __repr__(self) -> str:
        return f"Op({self.name!r}, impls={self.names()})"

    def register(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        supports: Callable[[torch.device], bool] = any_device,
        priority: int = 0,
        auto: Callable[[torch.device], bool] | None = None,
        dtypes: tuple[torch.dtype, ...] | None = None,
    ) -> Impl:
        """Add implementation `name`; a higher `priority` wins automatic selection among those
        whose `auto(device)` (default: `supports(device)`) holds and that take the input's dtype
        (`dtypes`, None: any)."""
        if name in self._impls:
            raise ValueError(f"{self.name} implementation {name!r} is already registered")
        impl = Impl(name=name, fn=fn, supports=supports, priority=priority, auto=auto,
                    dtypes=dtypes)  # fmt: skip
        self._impls[name] = impl
        return impl

    def names(self) -> list[str]:
        """Names of all registered implementations, highest priority first."""
        return [i.name for i in sorted(self._impls.values(), key=lambda i: -i.priority)]

    def available(self, device: torch.device | str) -> list[Impl]:
        """Implementations that support `device`, highest priority first."""
        device = torch.device(device)
        impls = sorted(self._impls.values(), key=lambda i: -i.priority)
        return [i for i in impls if i.supports(device)]

    def select(
        self,
        device: torch.device | str,
        requested: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Impl:
        """The implementation to run on `device` for inputs of `dtype` (see the module
        docstring for the order)."""
        device = torch.device(device)
        source = "requested"
        if requested is None:
            requested = forced_impl(self.name)
            source = f"forced by {ENV_VAR}"
        if requested is not None:
            impl = self._impls.get(requested)
            if impl is None or not impl.supports(device):
                available = ", ".join(i.name for i in self.available(device)) or "none"
                raise ValueError(
                    f"{self.name} implementation {requested!r} is not available on "
                    f"{device.type}; available: {available}"
                )
            if not impl.takes(dtype):
                raise ValueError(
                    f"{self.name} implementation {requested!r} does not take {dtype} inputs; "
                    f"it takes {', '.join(str(d) for d in impl.dtypes or ())}"
                )
            if source != "requested":
                self._log_once(impl, device, source)
            return impl
        available = [
            i for i in self.available(device) if i.chosen_automatically(device) and i.takes(dtype)
        ]
        if not available:
            raise ValueError(
                f"no {self.name} implementation is available on {device.type}; "
                f"registered: {', '.join(self.names()) or 'none'}"
            )
        self._log_once(available[0], device, "chosen automatically")
        return available[0]

    def _log_once(self, impl: Impl, device: torch.device, how: str) -> None:
        key = (self.name, device.type)
        if key not in _LOGGED:
            _LOGGED.add(key)
            logger.info("hybrid.ops: %s uses %r on %s (%s)", self.name, impl.name, device.type, how)


def define_op(name: str) -> Op:
    """Create op `name` and add it to the table (once per name)."""
    if name in _OPS:
        raise ValueError(f"op {name!r} is already defined")
    op = _OPS[name] = Op(name)
    return op


def get_op(name: str) -> Op:
    """The op called `name`; ValueError naming the known ops if there is none."""
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; known: {', '.join(sorted(_OPS))}") from None


def op_names() -> list[str]:
    return sorted(_OPS)


def register(
    op: str,
    name: str,
    fn: Callable[..., Any],
    *,
    supports: Callable[[torch.device], bool] = any_device,
    priority: int = 0,
    auto: Callable[[torch.device], bool] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
) -> Impl:
    """Register implementation `name` of op `op` (see `Op.register`)."""
    return get_op(op).register(
        name, fn, supports=supports, priority=priority, auto=auto, dtypes=dtypes
    )


def parse_forced(value: str) -> dict[str, str]:
    """Parse a `HYBRID_OPS_IMPL` value into {op: impl}; a bare name maps to key "*"."""
    forced: dict[str, str] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        op, sep, impl = (s.strip() for s in item.partition("="))
        if not sep:
            op, impl = "*", op
        if not op or not impl:
            raise ValueError(f"{ENV_VAR}: expected 'op=impl' or 'impl', got {item!r}")
        if op != "*" and op not in _OPS:
            raise ValueError(f"{ENV_VAR}: unknown op {op!r}; known: {', '.join(sorted(_OPS))}")
        forced[op] = impl
    return forced


def forced_impl(op: str) -> str | None:
    """The implementation `HYBRID_OPS_IMPL` forces for `op`, if any."""
    value = os.environ.get(ENV_VAR, "")
    if not value.strip():
        return None
    forced = parse_forced(value)
    return forced.get(op, forced.get("*"))


__all__ = [
    "ENV_VAR",
    "Impl",
    "Op",
    "any_device",
    "define_op",
    "forced_impl",
    "get_op",
    "op_names",
    "parse_forced",
    "register",
]
