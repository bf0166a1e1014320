"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Legend: B batch, V vocabulary.

Sampling draws from softmax(logits / temperature) restricted to the top-k tokens and then to the
smallest set of most likely tokens whose probability reaches top-p (nucleus sampling, Holtzman et
al. 2020; a token is kept when the probability of the tokens ranked above it is below top_p, so
at least one token always stays). `temperature: 0` means greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hybrid.recipe.schema import check


@dataclass(kw_only=True)
class SamplingConfig:
    """temperature: > 0 samples, 0 is greedy (argmax); top_k: keep the k most likely tokens
    (None: all); top_p: keep the nucleus of probability top_p, in (0, 1] (None: all)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        check(self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
        check(self.top_k is None or self.top_k >= 1, "top_k", "must be at least 1")
        check(self.top_p is None or 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits_BV: Tensor, *, top_k: int | None, top_p: float | None) -> Tensor:
    """Logits with the tokens outside top-k and outside the top-p nucleus set to -inf."""
    out = logits_BV.float()
    if top_k is not None and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_BV, order_BV = torch.sort(out, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        before_BV = probs_BV.cumsum(-1) - probs_BV  # probability ranked above each token
        drop_sorted = before_BV >= top_p
        drop_BV = torch.zeros_like(drop_sorted).scatter(-1, order_BV, drop_sorted)
        out = out.masked_fill(drop_BV, float("-inf"))
    return out


def sample(
    logits_BV: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> Tensor:
    """Next token ids (B,) int64 from logits (B,V)."""
    if cfg.greedy:
        return logits_BV.argmax(-1)
    scaled = filter_logits(logits_BV.float() / cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


__all__ = ["SamplingConfig", "filter_logits", "sample"]
