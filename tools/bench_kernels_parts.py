"""Benchmark the Mamba-2 mixer's smaller kernels: causal conv1d (+SiLU) and gated RMSNorm.

    python tools/bench_kernels_parts.py                  # mixer shapes of shipped recipes, bf16
    python tools/bench_kernels_parts.py --no-reference   # skip the PyTorch references
    TRITON_INTERPRET=1 python tools/bench_kernels_parts.py --tiny   # a CPU smoke run

`bench_conv_norm(shapes)` returns one dict per (shape, op, implementation): forward and
forward+backward times (`triton.testing.do_bench` medians in ms on a GPU, a wall clock on the
CPU) and the bandwidth those times mean for the least traffic the op needs (conv: read x, write
y; backward also reads x and dy and writes dx; norm: read x and z, write y; backward reads x, z
and dy, writes dx and dz), to compare with the ~3 TB/s of an H100. Peers when importable: the
`causal_conv1d` CUDA extension (channels-last) and mamba_ssm's Triton `layernorm_gated`
(imported without its CUDA extensions). "det" says whether two of our backward passes give
bitwise-equal gradients, "same" the max relative difference of our output from the peer's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

from hybrid_kernels.conv1d_ref import causal_conv1d_ref  # noqa: E402
from hybrid_kernels.conv1d_triton import causal_conv1d_triton  # noqa: E402
from hybrid_kernels.rmsnorm_ref import gated_rmsnorm_ref  # noqa: E402
from hybrid_kernels.rmsnorm_triton import gated_rmsnorm_triton  # noqa: E402

Fn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MixerShape:
    """One Mamba-2 mixer's conv and norm sizes: conv channels D = I + 2*G*N, norm width I in
    groups of S."""

    name: str
    batch: int
    seqlen: int
    conv_dim: int
    d_inner: int
    group_size: int
    width: int = 4


SHAPES = [
    MixerShape("jamba-1to3 (d2048 G1)", 4, 4096, 4096 + 256, 4096, 4096),
    MixerShape("nemotron-h-8b (d4096 G8)", 2, 4096, 8192 + 2048, 8192, 1024),
    MixerShape("bamba-9b (d4096 G1)", 2, 4096, 8192 + 256, 8192, 8192),
    MixerShape("mamba2-2.7b (d2560 G1)", 4, 2048, 5120 + 256, 5120, 5120),
]
TINY = [MixerShape("tiny", 2, 37, 20, 24, 12)]


def load_causal_conv1d() -> Fn | None:
    """The `causal_conv1d` CUDA extension's function, or None if it is not installed."""
    if importlib.util.find_spec("causal_conv1d") is None:
        return None
    from causal_conv1d import causal_conv1d_fn

    return causal_conv1d_fn


def load_mamba_rmsnorm() -> Fn | None:
    """mamba_ssm's Triton gated RMSNorm, imported without its CUDA extensions; None if absent."""
    from bench_kernels import register_mamba_ssm

    if not register_mamba_ssm():
        return None
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

    return rmsnorm_fn


def time_ms(fn: Callable[[], object], leaves: list[torch.Tensor], reps: int, cuda: bool) -> float:
    """Median ms of `fn`: do_bench on a GPU (gradients reset between runs), a wall clock else."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, grad_to_none=leaves, rep=reps, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def conv_impls(with_reference: bool) -> dict[str, Fn]:
    """name -> f(x (B, L, D), weight, bias, seq_idx) -> y (B, L, D), SiLU fused."""
    impls: dict[str, Fn] = {
        "hybrid (triton)": lambda x, w, b, s: causal_conv1d_triton(x, w, b, activation="silu"),
        "hybrid (triton) +seq_idx": lambda x, w, b, s: causal_conv1d_triton(
            x, w, b, seq_idx=s, activation="silu"
        ),
    }
    peer = load_causal_conv1d()
    if peer is not None:  # channels-last: a (B, D, L) view with unit channel stride
        impls["causal_conv1d (CUDA)"] = lambda x, w, b, s: peer(
            x.transpose(1, 2), w.to(x.dtype), b.to(x.dtype), activation="silu"
        ).transpose(1, 2)
    if with_reference:
        impls["pytorch reference"] = lambda x, w, b, s: causal_conv1d_ref(
            x, w, b, activation="silu"
        )
    return impls


def norm_impls(group_size: int, with_reference: bool) -> dict[str, Fn]:
    """name -> f(x, z, weight) -> norm(x * silu(z)) * weight over groups of `group_size`."""
    impls: dict[str, Fn] = {
        "hybrid (triton)": lambda x, z, w: gated_rmsnorm_triton(x, z, w, group_size=group_size)
    }
    peer = load_mamba_rmsnorm()
    if peer is not None:
        impls["mamba_ssm layernorm_gated"] = lambda x, z, w: peer(
            x, w, None, z=z, eps=1e-5, group_size=group_size, norm_before_gate=False
        )
    if with_reference:
        impls["pytorch reference"] = lambda x, z, w: gated_rmsnorm_ref(
            x, z, w, group_size=group_size
        )
    return impls


def _inputs(shape: MixerShape, device: str, dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(0)
    B, L, D, I = shape.batch, shape.seqlen, shape.conv_dim, shape.d_inner

    def rand(*s: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*s, device=device, generator=gen).to(dt).requires_grad_()

    seq_idx = torch.zeros(B, L, dtype=torch.int32, device=device)
    for start in range(L // 3, L, L // 3 or 1):  # documents of L // 3 positions
        seq_idx[:, start:] += 1
    return {
        "conv": [rand(B, L, D), rand(D, shape.width, dt=torch.float32), rand(D), seq_idx],
        "norm": [rand(B, L, I), rand(B, L, I), rand(I, dt=torch.float32)],
    }


def _bench_one(fn: Fn, args: list, reps: int, cuda: bool) -> tuple[float, float, torch.Tensor]:
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    with torch.no_grad():
        out = fn(*args)
    grad = torch.randn_like(out)
    fwd = time_ms(lambda: fn(*args), leaves, reps, cuda)
    both = time_ms(lambda: fn(*args).backward(grad), leaves, reps, cuda)
    return fwd, both, out.float()


def _deterministic(fn: Fn, args: list) -> bool:
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    runs = []
    for _ in range(2):
        out = fn(*args)
        runs.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    return all(torch.equal(a, b) for a, b in zip(*runs))


def bench_conv_norm(
    shapes: list[MixerShape] | None = None,
    *,
    reps: int = 200,
    dtype: torch.dtype = torch.bfloat16,
    with_reference: bool = True,
) -> list[dict]:
    """Time conv1d and gated RMSNorm, ours against the peers, at each shape (default SHAPES).

    Returns one dict per (shape, op, impl): shape, op, impl, fwd_ms, fwdbwd_ms, fwd_gbs,
    fwdbwd_gbs (GB/s of the op's least traffic) and note (ours: det=..., same=...).
    """
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rows: list[dict] = []
    for shape in shapes or SHAPES:
        inputs = _inputs(shape, device, dtype)
        elt = inputs["conv"][0].element_size()
        passes = {
            "conv": (shape.conv_dim, 2, 5),
            "norm": (shape.d_inner, 3, 8),
        }  # (channels, fwd passes, fwd+bwd passes) over a (B, L, channels) tensor
        suites = {
            "conv": conv_impls(with_reference),
            "norm": norm_impls(shape.group_size, with_reference),
        }
        for op, impls in suites.items():
            args = inputs[op]
            channels, p_fwd, p_both = passes[op]
            nbytes = shape.batch * shape.seqlen * channels * elt
            outputs = {}
            for name, fn in impls.items():
                fwd, both, outputs[name] = _bench_one(fn, args, reps, cuda)
                gbs = (p_fwd * nbytes / fwd / 1e6, p_both * nbytes / both / 1e6)
                rows.append(
                    dict(shape=shape.name, op=op, impl=name, fwd_ms=fwd, fwdbwd_ms=both,
                         fwd_gbs=gbs[0], fwdbwd_gbs=gbs[1], note="")
                )  # fmt: skip
            ours = next(r for r in rows[-len(impls) :] if r["impl"] == "hybrid (triton)")
            ours["note"] = f"det={_deterministic(impls['hybrid (triton)'], args)}"
            peer = next((n for n in outputs if not n.startswith(("hybrid", "pytorch"))), None)
            if peer is not None:
                ref = outputs[peer]
                diff = (outputs["hybrid (triton)"] - ref).abs().max() / ref.abs().max()
                ours["note"] += f" same={diff.item():.1e}"
        if cuda:
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    print("| shape | op | impl | fwd ms | fwd+bwd ms | fwd GB/s | f+b GB/s | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['op']} | {r['impl']} | {r['fwd_ms']:.3f} | "
            f"{r['fwdbwd_ms']:.3f} | {r['fwd_gbs']:.0f} | {r['fwdbwd_gbs']:.0f} | {r['note']} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape (CPU interpreter check)")
    parser.add_argument("--no-reference", action="store_true", help="skip the PyTorch references")
    parser.add_argument("--reps", type=int, default=200, help="do_bench time budget per case (ms)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        parser.error("no CUDA device: use --tiny under TRITON_INTERPRET=1")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("no CUDA device: set TRITON_INTERPRET=1 to run the kernels on the CPU")
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"causal_conv1d: {'found' if load_causal_conv1d() else 'not importable'}; "
          f"mamba_ssm: {'found' if load_mamba_rmsnorm() else 'not importable'}")  # fmt: skip
    rows = bench_conv_norm(
        TINY if args.tiny else SHAPES,
        reps=5 if args.tiny else args.reps,
        with_reference=not args.no_reference,
    )
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
