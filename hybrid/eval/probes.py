"""Recall probes: MQAR and passkey retrieval accuracy of a model at several context lengths.

Each probe generates fresh examples (`hybrid.data.synthetic`, from a seed stream that the data
sources never use) with its settings' `seq_len` replaced by each context length, and scores:

* `mqar`: teacher-forced, one forward pass per batch: accuracy = the share of answer tokens
  (values after a repeated key) that are the argmax of the logits at the position before them;
  `example_accuracy` = the share of examples with every answer right.
* `passkey`: generation, through `hybrid.infer.generate` (prefill + recurrent decode, greedy):
  accuracy = the share of examples whose generated tokens start with the key exactly;
  `token_accuracy` = the share of key tokens generated right.

Probes are registered by name in `PROBES`; each is `fn(model, settings, tokenizer, *, context,
examples, batch_size, seed, progress) -> ProbeResult`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from hybrid.data.synthetic import Examples, generate_examples
from hybrid.infer.generate import generate
from hybrid.infer.sampling import SamplingConfig
from hybrid.recipe.data_config import SYNTHETIC_SOURCES
from hybrid.recipe.schema import ConfigError

PROBE_STREAM = 1  # the data sources draw stream 0


@dataclass
class ProbeResult:
    """One probe at one context length (see the module docstring for the two accuracies)."""

    probe: str
    context: int
    examples: int
    accuracy: float
    secondary: float
    secondary_name: str


Probe = Callable[..., ProbeResult]
PROBES: dict[str, Probe] = {}


def register_probe(name: str) -> Callable[[Probe], Probe]:
    def wrap(fn: Probe) -> Probe:
        PROBES[name] = fn
        return fn

    return wrap


def probe_examples(
    kind: str, settings: Any, tokenizer: Any, *, context: int, examples: int, seed: int
) -> Examples:
    """`examples` fresh examples of `kind` at length `context` (ConfigError if too short)."""
    try:
        cfg = dataclasses.replace(settings, seq_len=context, seed=seed, examples=examples)
    except ConfigError as err:
        raise ConfigError(f"{kind} probe at context {context}: {err}") from None
    return generate_examples(kind, cfg, tokenizer, examples, stream=PROBE_STREAM)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@register_probe("mqar")
@torch.no_grad()
def mqar_probe(
    model: nn.Module,
    settings: Any,
    tokenizer: Any,
    *,
    context: int,
    examples: int,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> ProbeResult:
    ex = probe_examples("mqar", settings, tokenizer, context=context, examples=examples, seed=seed)
    tokens, mask = torch.from_numpy(ex.tokens), torch.from_numpy(ex.loss_mask).bool()
    right = total = whole = 0
    model.eval()
    for i in tqdm(range(0, len(ex), batch_size), desc=f"mqar @{context}", disable=not progress):
        ids = tokens[i : i + batch_size].to(_device(model))
        logits = model(ids[:, :-1]).logits[..., : tokenizer.vocab_size]
        hit = (logits.argmax(-1) == ids[:, 1:]).cpu()
        m = mask[i : i + batch_size, 1:]
        right += int((hit & m).sum())
        total += int(m.sum())
        whole += int(((hit | ~m).all(dim=1)).sum())
    return ProbeResult("mqar", context, len(ex), right / total, whole / len(ex), "example_acc")


@register_probe("passkey")
@torch.no_grad()
def passkey_probe(
    model: nn.Module,
    settings: Any,
    tokenizer: Any,
    *,
    context: int,
    examples: int,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> ProbeResult:
    ex = probe_examples(
        "passkey", settings, tokenizer, context=context, examples=examples, seed=seed
    )
    starts = ex.answer_start().tolist()
    rows = ex.tokens.tolist()
    exact = right = total = 0
    greedy = SamplingConfig(temperature=0.0)
    for i in tqdm(range(0, len(ex), batch_size), desc=f"passkey @{context}", disable=not progress):
        prompts = [rows[j][: starts[j]] for j in range(i, min(i + batch_size, len(ex)))]
        answers = [rows[j][starts[j] : context - 1] for j in range(i, i + len(prompts))]
        out = generate(
            model,
            prompts,
            max_new_tokens=max(len(a) for a in answers),
            sampling=greedy,
            vocab_size=tokenizer.vocab_size,
        )
        for got, want in zip(out.tokens, answers):
            same = [g == w for g, w in zip(got, want)]
            exact += int(len(got) >= len(want) and all(same))
            right += sum(same)
            total += len(want)
    return ProbeResult("passkey", context, len(ex), exact / len(ex), right / total, "token_acc")


def probe_settings(kind: str, sources: Sequence[Any]) -> tuple[Any, bool]:
    """The settings of the first `kind` source in `sources` (True), else the defaults (False)."""
    for src in sources:
        if src.kind == kind:
            return src.synthetic(), True
    return SYNTHETIC_SOURCES[kind](), False


def default_contexts(settings: Any) -> list[int]:
    """Half, once, twice and four times the settings' example length."""
    L = settings.seq_len
    return sorted({max(L // 2, 1), L, 2 * L, 4 * L})


__all__ = [
    "PROBES",
    "PROBE_STREAM",
    "ProbeResult",
    "default_contexts",
    "mqar_probe",
    "passkey_probe",
    "probe_examples",
    "probe_settings",
    "register_probe",
]
