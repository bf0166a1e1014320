"""Small corpora for the data tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def random_texts(n: int, seed: int = 0, words: list[str] = WORDS, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(1, max_words))) + "\n"
        for _ in range(n)
    ]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({field: text, "id": i}) + "\n")
    return path
