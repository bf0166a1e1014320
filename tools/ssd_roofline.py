"""Memory traffic and FLOPs of each SSD kernel as launched, and their floor times on a GPU.

    python tools/ssd_roofline.py                          # the issue's shapes, H200 ceilings
    python tools/ssd_roofline.py --gpu h100 --shape 2,8192,256,64,8,256
    python tools/ssd_roofline.py --measured "fwd walk=3.1,dx=4.18" --shape 2,8192,256,64,8,256

A model, not a measurement: each kernel's DRAM bytes count every tensor it reads or writes once
(B and C, shared by a group's heads, are taken to come from DRAM once and then from the L2), and
its FLOPs count the matrix products (2 per multiply-add). The floor of a kernel is the larger
of bytes / bandwidth and FLOPs / matrix rate, with the ceilings measured on this workplace's
GPUs (device copy, 8192^3 bf16 product). "ideal" is a single fused pass that reads its inputs
and writes its outputs once. Compare measured kernel times (`tools/tune_ssd.py --no-sweep`) to
the floors to see what limits a kernel: far above both floors, it is bound by latency (the
chunk walks are sequential over a sequence's chunks), not by memory or arithmetic.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

# measured ceilings (/work/.library/device/KINDS.md): device copy (bytes read + written), bf16
# product of 8192^3 on random data
GPUS = {"h100": (3.0e12, 798e12), "h200": (4.3e12, 788e12)}
SHAPES = [  # (B, L, H, P, G, N), the issue's
    (4, 4096, 64, 64, 1, 128),
    (8, 2048, 64, 64, 8, 128),
    (1, 16384, 64, 64, 1, 128),
    (16, 1024, 64, 64, 1, 128),
    (2, 8192, 256, 64, 8, 256),
]
Q = 64  # chunk of our kernels
E, F32 = 2, 4  # bytes of a bf16 and an fp32 element
CB_MIN_N = 256  # from this N on the forward walk reads C B^T from its own kernel


@dataclass(frozen=True)
class Sizes:
    """Element counts of one call's tensors."""

    B: int
    L: int
    H: int
    P: int
    G: int
    N: int

    @property
    def xs(self) -> int:  # x, y, dy, dx, z: (B, L, H, P)
        return self.B * self.L * self.H * self.P

    @property
    def bc(self) -> int:  # B or C: (B, L, G, N)
        return self.B * self.L * self.G * self.N

    @property
    def dts(self) -> int:  # dt: (B, L, H)
        return self.B * self.L * self.H

    @property
    def states(self) -> int:  # a state per chunk and head: (B, nchunks, H, P, N)
        return self.B * math.ceil(self.L / Q) * self.H * self.P * self.N

    @property
    def cbs(self) -> int:  # C B^T per chunk and group: (B, nchunks, G, Q, Q)
        return self.B * math.ceil(self.L / Q) * self.G * Q * Q

    @property
    def th(self) -> int:  # token-heads
        return self.dts


def kernels(s: Sizes) -> dict[str, tuple[float, float]]:
    """{kernel: (DRAM bytes, FLOPs)} of the forward (default launch) and the backward's pieces,
    plus the split forward and the ideal single pass, for one call at sizes `s`."""
    cb = s.N >= CB_MIN_N
    prod_np, prod_qp, prod_qn = 2 * s.N * s.P, 2 * Q * s.P, 2 * Q * s.N  # FLOPs per token-head
    state_walk = ((s.xs + s.dts) * E + s.bc * E + s.states * E, s.th * prod_np)
    out = {
        "C B^T": (2 * s.bc * E + s.cbs * F32, s.B * s.L * s.G * prod_qn) if cb else (0, 0),
        "fwd walk": (
            2 * s.xs * E + s.dts * E + 2 * s.bc * E + (s.cbs * F32 if cb else 0),
            s.th * (2 * prod_np + prod_qp + (0 if cb else prod_qn)),
        ),
        "split: state walk": state_walk,
        "split: y": (
            s.states * E + 2 * s.xs * E + s.dts * E + s.bc * E + (s.cbs * F32 if cb else s.bc * E),
            s.th * (prod_np + prod_qp + (0 if cb else prod_qn)),
        ),
        "bwd states": state_walk,
        "dstates": (s.xs * E + s.bc * E + s.dts * E + s.states * E, s.th * prod_np),
        "dx": (
            3 * s.xs * E + s.dts * (E + F32) + 2 * s.bc * E + s.states * E,
            s.th * (prod_np + prod_qn + 2 * prod_qp),
        ),
        "dx reading states": (  # without the state sums (state_sums=False; before session 9)
            3 * s.xs * E + s.dts * (E + F32) + 2 * s.bc * E + 2 * s.states * E,
            s.th * (2 * prod_np + prod_qn + 2 * prod_qp),
        ),
        "dB dC": (
            2 * s.xs * E + s.dts * E + 2 * s.bc * (E + F32) + 2 * s.states * E,
            s.th * (2 * prod_np + prod_qp + 2 * prod_qn),
        ),
    }
    fwd_flops = s.th * (2 * prod_np + prod_qp) + s.B * s.L * s.G * prod_qn
    out["ideal fwd"] = (2 * s.xs * E + s.dts * E + 2 * s.bc * E, fwd_flops)
    grads = s.xs * E + s.dts * F32 + 2 * s.bc * F32  # dx, ddt, dB, dC
    out["ideal fwd+bwd"] = (out["ideal fwd"][0] + 2 * s.xs * E + grads, 3 * fwd_flops)
    return out


def floor_ms(nbytes: float, flops: float, bw: float, rate: float) -> tuple[float, str]:
    mem, math_ = nbytes / bw * 1e3, flops / rate * 1e3
    return max(mem, math_), "memory" if mem >= math_ else "matrix"


def _measured(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        name, sep, ms = item.partition("=")
        try:
            out[name.strip()] = float(ms)
        except ValueError:
            raise SystemExit(f"--measured: expected NAME=MS, got {item!r}") from None
        if not sep:
            raise SystemExit(f"--measured: expected NAME=MS, got {item!r}")
    return out


def table(shape: tuple[int, ...], gpu: str, measured: dict[str, float]) -> list[str]:
    bw, rate = GPUS[gpu]
    rows = kernels(Sizes(*shape))
    unknown = set(measured) - set(rows)
    if unknown:
        raise SystemExit(f"--measured: unknown kernel(s) {sorted(unknown)}; use {sorted(rows)}")
    lines = [
        f"B{shape[0]} L{shape[1]} H{shape[2]} P{shape[3]} G{shape[4]} N{shape[5]}, {gpu} "
        f"ceilings {bw / 1e12:.1f} TB/s, {rate / 1e12:.0f} TFLOP/s",
        "| kernel | GB | GFLOP | floor ms | bound by | measured ms | measured / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (nbytes, flops) in rows.items():
        if nbytes == 0:
            continue
        ms, bound = floor_ms(nbytes, flops, bw, rate)
        got = measured.get(name)
        tail = f"{got:.3f} | {got / ms:.1f}x" if got is not None else " | "
        lines.append(
            f"| {name} | {nbytes / 1e9:.3f} | {flops / 1e9:.1f} | {ms:.3f} | {bound} | {tail} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h200", help="ceilings to use")
    parser.add_argument("--shape", action="append", help="B,L,H,P,G,N (default: the issue's)")
    parser.add_argument("--measured", help="NAME=MS,... measured times of one --shape's kernels")
    args = parser.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape or []] or SHAPES
    except ValueError:
        parser.error("--shape takes six integers B,L,H,P,G,N")
    if any(len(s) != 6 or min(s) < 1 for s in shapes):
        parser.error("--shape takes six positive integers B,L,H,P,G,N")
    measured = _measured(args.measured)
    if measured and len(shapes) != 1:
        parser.error("--measured needs exactly one --shape")
    for shape in shapes:
        print("\n".join(table(shape, args.gpu, measured)), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
