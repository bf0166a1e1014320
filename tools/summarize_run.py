"""Summarise training runs from their metrics.jsonl: first/last loss, tokens/s, MFU, memory.

python tools/summarize_run.py runs/hybrid-tiny runs/moe-tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def summarize(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[len(rows) // 5 :] or rows  # skip warm-up / compilation steps
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return {
        "run": run_dir.name,
        "steps": rows[-1]["step"],
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(mfus) if mfus else None,
        "memory_gb": rows[-1].get("memory_gb"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print(
        f"{'run':<24}{'steps':>7}{'loss first':>12}{'loss last':>11}{'tok/s':>12}"
        f"{'MFU':>8}{'mem GB':>8}"
    )
    for run in args.runs:
        s = summarize(run)
        mfu = f"{100 * s['mfu']:.2f}%" if s["mfu"] is not None else "-"
        mem = f"{s['memory_gb']:.2f}" if s["memory_gb"] is not None else "-"
        print(
            f"{s['run']:<24}{s['steps']:>7}{s['loss_first']:>12.4f}{s['loss_last']:>11.4f}"
            f"{s['tokens_per_s']:>12,.0f}{mfu:>8}{mem:>8}"
        )


if __name__ == "__main__":
    main()
