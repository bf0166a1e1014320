"""Generators of synthetic recall examples: multi-query associative recall (MQAR) and passkey
retrieval. numpy only; used by the data layer (source kinds `mqar`, `passkey`) and the probes.

Legend: n examples, L example length (`seq_len`, end-of-document token included), P pairs,
Q queries.

Every example is exactly L tokens and ends with the end-of-document id; `loss_mask` (n,L) is 1
on the tokens a model must predict (the answers) and 0 elsewhere.

MQAR (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language
Models"): `k1 v1 k2 v2 ... kP vP`, then the rest of the example is filler tokens among which Q
of the keys reappear at uniformly random pair-aligned places, each followed by its value:
`... f f k3 v3 f f f f k1 v1 f ...`. Keys are distinct within an example; values are drawn with
replacement. (Zoology draws the query places with a power-law bias towards the pairs; uniform
places make the distance to recall grow with L, which is what the probes measure.)

Passkey (Mohtashami & Jaggi 2023, "Landmark Attention"): filler sentences, with
" The pass key is K. Remember it. K is the pass key." at a uniformly random depth, then
" What is the pass key? The pass key is" and the answer " K". Pieces are tokenised separately
with the recipe's tokenizer and concatenated; the filler is cut to make the example L tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hybrid.recipe.data_config import MQARConfig, PasskeyConfig
from hybrid.recipe.schema import ConfigError

PASSKEY_FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
PASSKEY_QUESTION = " What is the pass key? The pass key is"


def passkey_info(key: str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key."


@dataclass
class Examples:
    """tokens (n,L) int64 and loss_mask (n,L) uint8 (1: a token to predict)."""

    tokens: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def answer_start(self) -> np.ndarray:
        """(n,) index of each example's first answer token (the end of its prompt)."""
        return self.loss_mask.argmax(axis=1)


# kind -> generator(settings, tokenizer, n, rng) -> Examples
Generator = Callable[[Any, Any, int, np.random.Generator], Examples]
GENERATORS: dict[str, Generator] = {}


def register_generator(kind: str) -> Callable[[Generator], Generator]:
    def wrap(fn: Generator) -> Generator:
        GENERATORS[kind] = fn
        return fn

    return wrap


def generate_examples(
    kind: str, settings: Any, tokenizer: Any, n: int, *, stream: int = 0
) -> Examples:
    """`n` examples of source kind `kind`, reproducible from `settings.seed` and `stream`
    (the data source uses stream 0, the probes another one)."""
    if kind not in GENERATORS:
        raise ConfigError(f"unknown synthetic kind {kind!r} (known: {', '.join(GENERATORS)})")
    rng = np.random.default_rng([settings.seed, stream])
    return GENERATORS[kind](settings, tokenizer, n, rng)


def _distinct(rng: np.random.Generator, n: int, population: int, k: int) -> np.ndarray:
    """(n,k): k distinct draws from range(population) per row, in random order."""
    return rng.random((n, population)).argsort(axis=1)[:, :k]


@register_generator("mqar")
def mqar_examples(cfg: MQARConfig, tokenizer: Any, n: int, rng: np.random.Generator) -> Examples:
    """MQAR examples (see the module docstring)."""
    eod, vocab = tokenizer.eod_id, tokenizer.vocab_size
    if cfg.filler_id >= vocab or cfg.first_id <= eod <= cfg.filler_id:
        raise ConfigError(
            f"ids {cfg.first_id}..{cfg.filler_id} must lie below the tokenizer's vocabulary "
            f"({vocab}) and avoid its end-of-document id {eod}; change first_id, key_vocab or "
            "value_vocab",
            key="mqar",
        )
    P, Q, L = cfg.num_pairs, cfg.queries, cfg.seq_len
    keys_nP = _distinct(rng, n, cfg.key_vocab, P) + cfg.first_id
    values_nP = rng.integers(0, cfg.value_vocab, size=(n, P)) + cfg.first_id + cfg.key_vocab
    tokens = np.full((n, L), cfg.filler_id, dtype=np.int64)
    mask = np.zeros((n, L), dtype=np.uint8)
    tokens[:, 0 : 2 * P : 2], tokens[:, 1 : 2 * P : 2] = keys_nP, values_nP
    slots = (L - 1 - 2 * P) // 2
    qpos_nQ = 2 * P + 2 * np.sort(_distinct(rng, n, slots, Q), axis=1)
    asked_nQ = _distinct(rng, n, P, Q)
    rows = np.arange(n)[:, None]
    tokens[rows, qpos_nQ] = np.take_along_axis(keys_nP, asked_nQ, axis=1)
    tokens[rows, qpos_nQ + 1] = np.take_along_axis(values_nP, asked_nQ, axis=1)
    mask[rows, qpos_nQ + 1] = 1
    tokens[:, -1] = eod
    return Examples(tokens, mask)


@register_generator("passkey")
def passkey_examples(
    cfg: PasskeyConfig, tokenizer: Any, n: int, rng: np.random.Generator
) -> Examples:
    """Passkey examples (see the module docstring)."""
    L = cfg.seq_len
    filler = np.asarray(tokenizer.encode(PASSKEY_FILLER), dtype=np.int64)
    question = tokenizer.encode(PASSKEY_QUESTION)
    tokens = np.zeros((n, L), dtype=np.int64)
    mask = np.zeros((n, L), dtype=np.uint8)
    keys = rng.integers(10 ** (cfg.digits - 1), 10**cfg.digits, size=n)
    depths = rng.random(n)
    for i, key in enumerate(keys.tolist()):
        info = tokenizer.encode(passkey_info(str(key)))
        answer = tokenizer.encode(f" {key}")
        n_fill = L - 1 - len(info) - len(question) - len(answer)
        if n_fill < 0:
            raise ConfigError(
                f"seq_len {L} is too short: the passkey text alone takes {L - n_fill} tokens "
                "with this tokenizer",
                key="passkey.seq_len",
            )
        stream = np.resize(filler, n_fill)
        before = int(round(depths[i] * n_fill))
        doc = np.concatenate(
            [stream[:before], info, stream[before:], question, answer, [tokenizer.eod_id]]
        )
        tokens[i] = doc
        mask[i, L - 1 - len(answer) : L - 1] = 1
    return Examples(tokens, mask)


__all__ = [
    "GENERATORS",
    "PASSKEY_FILLER",
    "PASSKEY_QUESTION",
    "Examples",
    "generate_examples",
    "mqar_examples",
    "passkey_examples",
    "passkey_info",
    "register_generator",
]
