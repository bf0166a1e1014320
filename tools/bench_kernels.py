"""Benchmark the SSD scan: our Triton kernels, mamba_ssm's, and the PyTorch reference, side by side.

    python tools/bench_kernels.py                 # the issue's shapes, bf16, on the current GPU
    python tools/bench_kernels.py --no-reference  # skip the (slow) PyTorch reference
    TRITON_INTERPRET=1 python tools/bench_kernels.py --tiny   # a CPU smoke run of the script

Times are `triton.testing.do_bench` medians in ms, forward and forward+backward (dt_bias,
softplus and D as in a Mamba-2 layer). mamba_ssm's `mamba_chunk_scan_combined` is timed at chunk
128 and 256 and its best is kept (the SSD result does not depend on the chunk size). TFLOP/s use
one fixed count for every implementation: per token and head, 2*256*P (intra-chunk products at
chunk 256) + 4*N*P (state in and out), x3 for forward+backward (the convention of the issue's
"70 GFLOP" floor at B4 L4096 H64 P64 N128). "same" checks that our y matches mamba_ssm's (max
relative difference) and "det" that two of our backward passes give bitwise-equal gradients.
Our launches are tuned afresh in each run, outside the timing (the disk cache of tuned launches
is not used unless HYBRID_KERNELS_TUNE_CACHE names a folder).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import os
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (when imported, not run)

import ssd_roofline  # noqa: E402
from hybrid_kernels.ssd_ref import ssd_chunked_ref  # noqa: E402
from hybrid_kernels.ssd_triton import ssd_triton  # noqa: E402

SHAPES = [  # (B, L, H, P, G, N)
    (4, 4096, 64, 64, 1, 128),
    (8, 2048, 64, 64, 8, 128),
    (1, 16384, 64, 64, 1, 128),
    (16, 1024, 64, 64, 1, 128),
    (2, 8192, 256, 64, 8, 256),
]
TINY = [(2, 100, 4, 16, 2, 16)]


@dataclass
class Row:
    shape: str
    impl: str
    fwd_ms: float
    fwdbwd_ms: float
    fwd_tflops: float
    fwdbwd_tflops: float
    note: str = ""


def register_mamba_ssm() -> bool:
    """Register the mamba_ssm package without running its __init__ (which imports CUDA
    extensions), so its Triton kernels import alone; False if mamba_ssm is not installed."""
    if "mamba_ssm" in sys.modules:
        return True
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        return False
    if "mamba_ssm" not in sys.modules:
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = pkg
    return True


def load_mamba_ssm():
    """mamba_ssm's Triton SSD, imported without its CUDA extensions; None if not installed."""
    if not register_mamba_ssm():
        return None
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined


def make_inputs(shape, device, dtype=torch.bfloat16):
    b, L, H, P, G, N = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*s, scale=1.0):
        return torch.randn(*s, device=device, generator=gen) * scale

    return dict(
        x=rand(b, L, H, P).to(dtype).requires_grad_(),
        dt=rand(b, L, H, scale=0.5).to(dtype).requires_grad_(),
        A=(-torch.exp(rand(H, scale=0.5))).requires_grad_(),
        B=rand(b, L, G, N).to(dtype).requires_grad_(),
        C=rand(b, L, G, N).to(dtype).requires_grad_(),
        D=rand(H).requires_grad_(),
        dt_bias=rand(H, scale=0.5).requires_grad_(),
    )


def flops(shape) -> float:
    b, L, H, P, _, N = shape
    return b * L * H * (2 * 256 * P + 4 * N * P)


def bench(fn, inputs, grad, *, bwd: bool, reps: int) -> float:
    """Median ms of fn (and its backward): do_bench on a GPU, a wall clock on the CPU."""
    leaves = list(inputs.values())

    def step():
        y = fn(**inputs)
        if bwd:
            y.backward(grad)

    if grad.is_cuda:
        from triton.testing import do_bench

        step()  # compile and tune outside the timing: do_bench sizes its repeats from a first
        torch.cuda.synchronize()  # estimate, and one slow call there leaves a single sample
        return do_bench(step, grad_to_none=leaves, rep=reps, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def grads_equal(fn, inputs, grad) -> bool:
    out = []
    for _ in range(2):
        for t in inputs.values():
            t.grad = None
        fn(**inputs).backward(grad)
        out.append([t.grad.clone() for t in inputs.values()])
    return all(torch.equal(a, b) for a, b in zip(*out))


def implementations(mamba, with_reference: bool):
    impls = {"hybrid (triton)": lambda **k: ssd_triton(**k, dt_softplus=True)}
    if mamba is not None:
        for chunk in (128, 256):
            impls[f"mamba_ssm c{chunk}"] = lambda chunk=chunk, **k: mamba(
                k["x"], k["dt"], k["A"], k["B"], k["C"], chunk, D=k["D"],
                dt_bias=k["dt_bias"], dt_softplus=True,
            )  # fmt: skip
    if with_reference:
        impls["pytorch reference c256"] = lambda **k: ssd_chunked_ref(
            **k, chunk_size=256, dt_softplus=True
        )
    return impls


def run_shape(shape, impls, device, reps) -> list[Row]:
    inputs = make_inputs(shape, device)
    grad = torch.randn_like(inputs["x"])
    rows, outputs = [], {}
    for name, fn in impls.items():
        with torch.no_grad():
            outputs[name] = fn(**inputs).float()
        fwd = bench(fn, inputs, grad, bwd=False, reps=reps)
        both = bench(fn, inputs, grad, bwd=True, reps=reps)
        f = flops(shape)
        rows.append(Row(str(shape), name, fwd, both, f / fwd / 1e9, 3 * f / both / 1e9))
    ours = rows[0]
    ours.note = f"det={grads_equal(impls['hybrid (triton)'], inputs, grad)}"
    peer = next((n for n in outputs if n.startswith("mamba_ssm")), None)
    if peer is not None:
        ref = outputs[peer]
        diff = ((outputs["hybrid (triton)"] - ref).abs().max() / ref.abs().max()).item()
        ours.note += f" same={diff:.1e}"
    return rows


def print_row(r: Row) -> None:
    print(
        f"| {r.shape} | {r.impl} | {r.fwd_ms:.3f} | {r.fwdbwd_ms:.3f} | {r.fwd_tflops:.0f} |"
        f" {r.fwdbwd_tflops:.0f} | {r.note} |",
        flush=True,
    )


def gpu_ceilings(name: str) -> str | None:
    """The `tools/ssd_roofline.py` ceilings for a GPU name (H100 / H200), else None."""
    return next((g for g in ssd_roofline.GPUS if g in name.lower()), None)


def floor_ratios(shape: str, mine: Row, gpu: str) -> str:
    """Our times over the floor of one fused pass (tools/ssd_roofline.py) on `gpu`'s ceilings."""
    bw, rate = ssd_roofline.GPUS[gpu]
    model = ssd_roofline.kernels(ssd_roofline.Sizes(*ast.literal_eval(shape)))
    fwd = ssd_roofline.floor_ms(*model["ideal fwd"], bw, rate)[0]
    both = ssd_roofline.floor_ms(*model["ideal fwd+bwd"], bw, rate)[0]
    return (
        f"; ours / floor ({gpu} ceilings): fwd {mine.fwd_ms / fwd:.1f}x of {fwd:.3f} ms, "
        f"fwd+bwd {mine.fwdbwd_ms / both:.1f}x of {both:.3f} ms"
    )


def print_table(rows: list[Row], gpu: str | None = None) -> None:
    print("| shape (B,L,H,P,G,N) | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | f+b TFLOP/s | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print_row(r)
    print("\nours / mamba_ssm best (lower is better), and ours / the floor of one fused pass:")
    for shape in dict.fromkeys(r.shape for r in rows):
        mine = next(r for r in rows if r.shape == shape and r.impl.startswith("hybrid"))
        peers = [r for r in rows if r.shape == shape and r.impl.startswith("mamba_ssm")]
        line = f"  {shape}: no mamba_ssm"
        if peers:
            fwd = min(p.fwd_ms for p in peers)
            both = min(p.fwdbwd_ms for p in peers)
            line = f"  {shape}: fwd {mine.fwd_ms / fwd:.2f}x, fwd+bwd {mine.fwdbwd_ms / both:.2f}x"
        print(line + (floor_ratios(shape, mine, gpu) if gpu else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape (CPU interpreter check)")
    parser.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--reps", type=int, default=200, help="do_bench time budget per case (ms)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument(
        "--verbose", action="store_true", help="log every launch candidate the tuner timed"
    )
    parser.add_argument(
        "--shape", action="append", help="B,L,H,P,G,N to time instead of the default shapes"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HYBRID_KERNELS_TUNE_CACHE", "0")  # time the candidates every run
    logging.basicConfig(format="%(name)s: %(message)s")
    level = logging.DEBUG if args.verbose else logging.INFO  # the launch tuner's choices
    logging.getLogger("hybrid_kernels").setLevel(level)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        parser.error("no CUDA device: use --tiny under TRITON_INTERPRET=1")
    mamba = load_mamba_ssm() if device == "cuda" else None
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"mamba_ssm: {'found' if mamba else 'not importable, timing ours only'}")
    impls = implementations(mamba, not args.no_reference)
    rows = []
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else SHAPES
    for shape in TINY if args.tiny else shapes:
        rows += run_shape(shape, impls, device, 5 if args.tiny else args.reps)
        for row in rows[-len(impls) :]:  # as measured, in case a long run is cut short
            print_row(row)
        torch.cuda.empty_cache() if device == "cuda" else None
    print_table(rows, gpu_ceilings(torch.cuda.get_device_name()) if device == "cuda" else None)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
