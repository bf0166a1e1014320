"""Logits parity between our model and the exported Hugging Face model.

Both run in float32 on the same random tokens: our model with exactly the weights that were
exported (rounded to the export dtype, then widened), the HF model loaded from OUT_DIR with
`AutoModelForCausalLM.from_pretrained(..., dtype=float32)`. Reported: the maximum relative
logits error max|ours - hf| / max|hf| (it must stay within `TOLERANCE`), and greedy decoding
agreement: HF `generate()` against our own recurrent decoding (prefill, then one token at a time
through the Mamba / KV states). A differing token is accepted only where our two candidate
logits tie within the tolerance.

Shapes: B batch, L tokens, N new tokens, V (padded) vocabulary.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import Tensor

from hybrid.convert._hf import require_transformers
from hybrid.recipe.model_config import ModelConfig

log = logging.getLogger(__name__)
TOLERANCE = 1e-4


@dataclasses.dataclass
class VerifyReport:
    max_rel_error: float
    shape: tuple[int, int]
    greedy_equal: int
    greedy_total: int
    first_divergence: int | None = None
    divergence_is_tie: bool = False
    load_problems: str = ""

    @property
    def passed(self) -> bool:
        greedy_ok = self.first_divergence is None or self.divergence_is_tie
        return not self.load_problems and self.max_rel_error <= TOLERANCE and greedy_ok

    def summary(self) -> str:
        if self.load_problems:
            return f"verify FAILED: the HF model did not load every weight ({self.load_problems})"
        status = "passed" if self.passed else "FAILED"
        tie = " (at a tie)" if self.first_divergence is not None and self.divergence_is_tie else ""
        return (
            f"verify {status}: max relative logits error {self.max_rel_error:.2e} (tolerance "
            f"{TOLERANCE:g}) on {self.shape[0]}x{self.shape[1]} random tokens in float32; greedy "
            f"generation {self.greedy_equal}/{self.greedy_total} tokens agree{tie}"
        )


def build_ours(cfg: ModelConfig, state: dict[str, Tensor]) -> torch.nn.Module:
    """Our model in float32 (eval mode) holding `state`."""
    from hybrid.model import build_model

    model = build_model(cfg, init=False)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, prompt_BL: Tensor, n_new: int) -> tuple[Tensor, Tensor]:
    """Our recurrent greedy decoding: (tokens (B, N), logits of each step (B, N, V))."""
    states = model.empty_states(prompt_BL.shape[0], dtype=torch.float32)
    logits = model(prompt_BL, states=states).logits[:, -1]
    tokens, steps = [], []
    for n in range(n_new):
        steps.append(logits)
        tokens.append(logits.argmax(-1))
        if n + 1 < n_new:
            logits = model(tokens[-1][:, None], states=states).logits[:, -1]
    return torch.stack(tokens, 1), torch.stack(steps, 1)


def load_hf(out_dir: Path, remote_code: bool) -> tuple[torch.nn.Module, str]:
    """The exported model in float32, and a description of any weights it did not load."""
    hf = require_transformers()
    model, info = hf.AutoModelForCausalLM.from_pretrained(
        str(out_dir), dtype=torch.float32, trust_remote_code=remote_code, output_loading_info=True
    )
    parts = [f"{k} {sorted(v)[:3]}" for k, v in info.items() if k != "error_msgs" and v]
    parts += [str(m) for m in info.get("error_msgs") or []]
    return model.eval(), "; ".join(parts)


@torch.no_grad()
def verify_export(
    out_dir: Path,
    cfg: ModelConfig,
    state: dict[str, Tensor],
    *,
    remote_code: bool,
    batch: int = 2,
    length: int = 64,
    prompt: int = 12,
    new_tokens: int = 12,
    seed: int = 0,
) -> VerifyReport:
    """Compare our model (with `state`, the exported weights) and the model in `out_dir`."""
    ours = build_ours(cfg, state)
    theirs, problems = load_hf(out_dir, remote_code)
    if problems:
        return VerifyReport(float("nan"), (batch, length), 0, 0, load_problems=problems)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)
    ref = ours(tokens).logits
    out = theirs(input_ids=tokens).logits.float()
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    ours_new, ours_logits = greedy_decode(ours, tokens[:, :prompt], new_tokens)
    theirs.generation_config.eos_token_id = None  # decode all N tokens, EOS included
    hf_new = theirs.generate(
        tokens[:, :prompt],
        attention_mask=torch.ones_like(tokens[:, :prompt]),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )[:, prompt:]
    report = VerifyReport(rel, (batch, length), int((ours_new == hf_new).sum()), ours_new.numel())
    differ = (ours_new != hf_new).any(0).nonzero()
    if len(differ):
        step = int(differ[0])
        report.first_divergence = step
        logits = ours_logits[:, step]
        picked = logits.gather(1, ours_new[:, step : step + 1])
        other = logits.gather(1, hf_new[:, step : step + 1])
        gap = ((picked - other).abs().max() / logits.abs().max()).item()
        report.divergence_is_tie = gap <= TOLERANCE
    return report
