"""Time each SSD kernel launch alone over launch configurations (num_warps, num_stages).

    python tools/tune_ssd.py [--shape B,L,H,P,G,N]

Prints one line per kernel and configuration (do_bench median, ms) so the defaults in
`hybrid_kernels/ssd_triton.py` can be chosen from measurements on the GPU at hand.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

from hybrid_kernels import ssd_triton as k  # noqa: E402


def report_resources(kernel) -> None:
    """Registers, spills and shared memory of each compiled variant of a Triton kernel."""
    caches = getattr(kernel, "device_caches", None) or {}
    for entry in caches.values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        for compiled in list(cache.values())[:12]:
            meta = getattr(compiled, "metadata", None)
            print(
                f"  {kernel.fn.__name__}: regs {getattr(compiled, 'n_regs', '?')} spills "
                f"{getattr(compiled, 'n_spills', '?')} smem {getattr(meta, 'shared', '?')} "
                f"warps {getattr(meta, 'num_warps', '?')} stages {getattr(meta, 'num_stages', '?')}"
            )


def bench(fn, device: str) -> float:
    """Median ms of `fn()`: do_bench on the GPU; a few wall-clock runs on the CPU interpreter
    (which has no Triton driver; there the numbers only show that the script runs)."""
    if device != "cpu":
        return do_bench(fn, rep=50, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4,4096,64,64,1,128", help="B,L,H,P,G,N")
    parser.add_argument("--only", help="comma-separated kernel names to sweep (default: all)")
    parser.add_argument("--no-sweep", action="store_true", help="time the defaults only")
    parser.add_argument(
        "--device",
        default="cuda",
        help="where to run (cuda; cpu only under "
        "TRITON_INTERPRET=1, to check the script at tiny shapes)",
    )
    args = parser.parse_args(argv)
    b, L, H, P, G, N = (int(v) for v in args.shape.split(","))
    dev, bf = args.device, torch.bfloat16
    x = torch.randn(b, L, H, P, device=dev, dtype=bf)
    dt = torch.randn(b, L, H, device=dev, dtype=bf) * 0.5
    A = -torch.rand(H, device=dev) - 0.1
    B = torch.randn(b, L, G, N, device=dev, dtype=bf)
    C = torch.randn(b, L, G, N, device=dev, dtype=bf)
    D = torch.randn(H, device=dev)
    dtb = torch.randn(H, device=dev) * 0.5
    dy = torch.randn_like(x)
    common = (dtb, None, None, True, 0.0, float("inf"))
    _, _, _, states = k._scan_fwd(
        x, dt, A, B, C, D, None, *common, write_y=False, write_ypre=False, store_states=True,
        chunk=k.KERNEL_CHUNK,
    )  # fmt: skip
    dstates, _ = k._dstates(dy, None, None, dt, A, C, dtb, None, True, 0.0, float("inf"), H, P)
    inf = float("inf")
    fwd = dict(write_y=True, write_ypre=False, store_states=False)
    rec = dict(write_y=False, write_ypre=False, store_states=True, chunk=k.KERNEL_CHUNK)
    bwd_args = (x, dy, None, None, dt, A, B, C, D, dtb, None, states, dstates, True, 0.0, inf)
    BN = k._blocks(P, N)[1]
    splits = (False, True) if BN >= 64 else (False,)  # the walks' state whole or in N halves
    sweeps = {
        "fwd y": (
            lambda **c: k._scan_fwd(x, dt, A, B, C, D, None, *common, **fwd, **c),
            [dict(block_p=p, num_warps=w, num_stages=s, cb=cb, segments=g, chunk=q)
             for p in (16, 32, 64) for w in (4, 8) for s in (1, 2) for cb in (False, True)
             for g in (1, 2, 4, 8) for q in (32, 64)
             if not (cb and N < k.CB_MIN_N) and not (q == 32 and cb)]
            + [dict(block_p=p, num_warps=w, cb=cb, segments=1, split_n=not k._split_n(BN, None))
               for p in (32, 64) for w in (4, 8) for cb in (False, True) if BN >= 64]
            + [dict(split_y=y, cb=cb) for y in k.SPLIT_Y_LAUNCHES for cb in (False, True)],
        ),
        # the split forward's second kernel alone (its walk is "bwd states" with chunk 64)
        "split y": (
            lambda **c: k._chunk_y(x, dt, A, B, C, D, None, dtb, None, states, True, 0.0, inf,
                                   write_ypre=False, chunk=k.KERNEL_CHUNK,
                                   **{"cb": k._use_cb(N, None), **c}),
            [dict(block_n=n, num_warps=w, num_stages=s, cb=cb) for n in (32, 64, 128)
             for w in (4, 8) for s in (1, 2, 3) for cb in (False, True)],
        ),
        "bwd states": (
            lambda **c: k._scan_fwd(x, dt, A, B, C, None, None, *common, **rec, **c),
            [dict(block_p=p, num_warps=w, num_stages=s, split_n=ns) for p in (16, 32, 64)
             for w in (4, 8) for s in (2, 3) for ns in splits],
        ),
        "dstates": (
            lambda **c: k._dstates(dy, None, None, dt, A, C, dtb, None, True, 0.0, inf, H, P, **c),
            [dict(block_p=p, num_warps=w, num_stages=s, split_n=ns) for p in (16, 32, 64)
             for w in (4, 8) for s in (2, 3) for ns in splits],
        ),
        "dx": (
            lambda **c: k._chunk_bwd(*bwd_args, run_dbc=False, **c),
            [dict(dx_block_n=n, num_warps=w, num_stages=s, heads_first=f, dx_cb=cb,
                  state_sums=ss)
             for n in (64, 128) for w in (4, 8) for s in (1, 2) for f in (False, True)
             for cb in (False, True) for ss in (False, True)],
        ),
        "dB dC": (
            lambda **c: k._chunk_bwd(*bwd_args, run_dx=False, **c),
            [dict(dbc_block_n=n, dbc_warps=w, dbc_stages=s, dbc_min_programs=m, blocks_first=f,
                  state_sums=ss)
             for n in (64, 128) for w in (4, 8) for s in (1, 2) for m in (264, 1056)
             for f in (False, True) for ss in (False, True)],
        ),
        # dx reads the states itself, or takes their terms from dB/dC (which then does more):
        # the trade is between the two kernels, so time them together
        "dx+dB dC": (
            lambda **c: k._chunk_bwd(*bwd_args, **c),
            [dict(state_sums=ss, dx_cb=cb, dx_block_n=n) for ss in (False, True)
             for cb in (False, True) for n in (64, 128)],
        ),
    }  # fmt: skip
    print(f"shape B{b} L{L} H{H} P{P} G{G} N{N}  (ms, do_bench median)")
    for name, (fn, configs) in sweeps.items():
        if args.only and name not in args.only.split(","):
            continue
        results = []
        default = bench(fn, dev)
        print(f"{name}: default {default:.3f}")
        if args.no_sweep:
            continue
        for cfg in configs:
            try:
                ms = bench(lambda c=cfg, f=fn: f(**c), dev)
                results.append((ms, cfg))
            except Exception as err:  # a configuration that does not compile (resources)
                print(f"  {name} {cfg}: failed ({type(err).__name__}: {str(err)[:80]})")
        results.sort(key=lambda r: r[0])
        print(f"{name}: " + " | ".join(f"{ms:.3f} {cfg}" for ms, cfg in results[:3]))
    for kernel in (k._ssd_scan_fwd_kernel, k._ssd_dstate_bwd_kernel, k._ssd_dx_bwd_kernel,
                   k._ssd_dbc_bwd_kernel):  # fmt: skip
        report_resources(kernel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
