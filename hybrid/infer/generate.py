"""Generation with the hybrid cache: one prefill pass, then one recurrent decode step per token.

Legend: B batch, L prompt length (longest prompt), V vocabulary (padded).

Prefill runs the model's ordinary forward (chunked SSD for Mamba layers, causal attention) with
`ctx.states`, which makes every mixer return its final state; those states are copied into a
pre-allocated `HybridCache`. Prompts of different lengths are left-padded, and the padding is a
separate document (`seq_idx`), so the Mamba state is reset at each prompt's start, attention does
not see the padding, and RoPE positions start at 0 at each prompt. Each decode step then costs
O(1) per Mamba layer and O(max_len) per attention layer (attention over the pre-allocated slots
under a mask), with tensor shapes that do not change from step to step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from hybrid.infer.cache import HybridCache
from hybrid.infer.rules import DecodeStep, decode_layers
from hybrid.infer.sampling import SamplingConfig, sample
from hybrid.model.context import ForwardContext


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Prompts -> ids (B,L) int64 left-padded with `pad_id`, and start (B,) of each prompt."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, L - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
    start = torch.tensor([L - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), start.to(device)


@torch.no_grad()
def prefill(
    model: nn.Module, ids_BL: Tensor, cache: HybridCache, start_B: Tensor | None = None
) -> Tensor:
    """Run the prompt (B,L) through `model`, fill `cache`; returns the last logits (B,V)."""
    B, L = ids_BL.shape
    if cache.max_len < L or cache.batch != B:
        raise ValueError(f"prompt {tuple(ids_BL.shape)} does not fit {cache}")
    if start_B is None:
        start_B = torch.zeros(B, dtype=torch.long, device=ids_BL.device)
    seq_idx = None
    if bool((start_B > 0).any()):  # padding is document 0, the prompt document 1
        seq_idx = (torch.arange(L, device=ids_BL.device)[None] >= start_B[:, None]).int()
    states: dict = {}
    h_BLD, _ = model.hidden_states(ids_BL, ForwardContext(seq_idx=seq_idx, states=states))
    cache.start.copy_(start_B)
    cache.load_prefill(states, L)
    return model.lm_head(h_BLD[:, -1])


@torch.no_grad()
def decode_step(model: nn.Module, ids_B: Tensor, cache: HybridCache) -> Tensor:
    """Feed one token per row (B,) at the cache's position; returns the next logits (B,V)."""
    if cache.length >= cache.max_len:
        raise ValueError(f"the cache is full: {cache}")
    step = DecodeStep(
        pos=cache.pos, start=cache.start, positions=(cache.pos - cache.start)[:, None]
    )
    h_B1D = decode_layers(model, model.embed(ids_B[:, None]), cache.layers, step)
    logits_BV = model.lm_head(model.norm_f(h_B1D))[:, 0]
    cache.advance()
    return logits_BV


@dataclass
class Generation:
    """New tokens per row (the end-of-document token, when one was sampled, ends the row and is
    not included), whether each row ended that way, cache size and timings."""

    tokens: list[list[int]]
    finished: list[bool]
    cache_bytes_per_sequence: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def ms_per_token(self) -> float:
        return 1000.0 * self.decode_seconds / max(self.decode_steps, 1)


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    eod_id: int | None = None,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Generation:
    """Continue each prompt (token ids) by up to `max_new_tokens` tokens, batched.

    A row stops at `eod_id` (when given); ids at or above `vocab_size` (the padded part of the
    model's vocabulary) are never chosen. `generator` seeds sampling."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    sampling = sampling or SamplingConfig()
    device = model.embed.weight.device
    ids, start = left_pad(prompts, eod_id if eod_id is not None else 0, device)
    B, L = ids.shape
    cache = HybridCache.allocate(model, B, L + max_new_tokens)
    t0 = _sync(device)
    logits = prefill(model, ids, cache, start)
    t1 = _sync(device)
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = 0
    for t in tqdm(range(max_new_tokens), desc="generate", unit="tok", disable=not progress):
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        nxt = sample(logits, sampling, generator)
        out[:, t] = nxt
        if eod_id is not None:
            done |= nxt == eod_id
            if bool(done.all()):
                break
        if t + 1 < max_new_tokens:
            logits = decode_step(model, nxt, cache)
            steps += 1
    t2 = _sync(device)
    return Generation(
        tokens=[_until(row, eod_id) for row in out[:, : t + 1].tolist()],
        finished=done.tolist(),
        cache_bytes_per_sequence=cache.bytes_per_sequence(),
        prefill_seconds=t1 - t0,
        decode_seconds=t2 - t1,
        decode_steps=steps,
    )


def _until(row: list[int], eod_id: int | None) -> list[int]:
    return row[: row.index(eod_id)] if eod_id is not None and eod_id in row else row


__all__ = ["Generation", "decode_step", "generate", "left_pad", "prefill"]
