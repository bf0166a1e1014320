"""Registers, spill bytes and shared memory of the SSD kernels for sm_90, without a GPU.

    pip install --no-deps --target /tmp/t36 triton==3.6.0   # the GPU image's Triton, with ptxas
    PYTHONPATH=/tmp/t36 python tools/ssd_registers.py fwd: fwd:warps=8 dx:BNK=128 dbc: dstate:

Each argument is KERNEL:KEY=VALUE,... with KERNEL one of fwd (forward walk), dx, dbc (dB/dC),
dstate (state gradients), y (the split forward's y from stored states), cb and keys among Q, BP,
BN / BNK / BNB, warps, stages, cb, y, store, ns, sums (see the functions below for the
defaults: the N = 256 launch), cb (the C B^T kernel), and for every kernel i64 (the 64-bit
offsets used for tensors of 2^31 elements or more), seq (packed documents, seq_idx) and z (the
gate), order (dB/dC's grid order, 0-2) and bh (the walks' grid axis of sequences x heads,
1 or 0). The kernel is compiled to PTX by Triton for an sm_90 target and assembled by
`ptxas -v`, which reports what the GPU would use; by default with the ptxas Triton bundles for
sm_90 (pass --ptxas for another). Timings still need the GPU (tools/tune_ssd.py).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

from hybrid_kernels import ssd_triton as k  # noqa: E402

FP32_PTRS = {
    "A_ptr", "D_ptr", "dtb_ptr", "init_ptr", "cb_ptr", "final_ptr", "decay_ptr", "ends_ptr",
    "ddt_ptr", "dA_ptr", "dD_ptr", "dinit_ptr", "dfinal_ptr", "dB_ptr", "dC_ptr", "csum_ptr",
    "hsum_ptr",
}  # fmt: skip
DIV16 = {"L", "H", "P", "N", "nchunks"}
FLAGS = dict(HAS_Z=False, HAS_DTB=True, SOFTPLUS=True, CLAMP=False, HAS_SEQ=False, PREC="tf32",
             I64=False)  # fmt: skip


def _arg_type(name: str, consts: dict) -> str:
    if name in consts:
        return "constexpr"
    if name.endswith("_ptr"):
        return "*i32" if name == "seq_ptr" else "*fp32" if name in FP32_PTRS else "*bf16"
    return "fp32" if name in ("dt_min", "dt_max") else "i32"


def _aligned(name: str) -> bool:
    return name.endswith("_ptr") or name.startswith("s_") or name in DIV16


def resources(fn, consts: dict, warps: int, stages: int, ptxas: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, shared memory bytes) of `fn` compiled with `consts`."""
    names = fn.arg_names
    sig = {n: _arg_type(n, consts) for n in names}
    # As Triton's launcher specializes them on the GPU: pointers, strides and sizes that are
    # multiples of 16 at the shapes get the divisibility hint (vector loads need it).
    hinted = [i for i, n in enumerate(names) if n not in consts and _aligned(n)]
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(names.index(n),): v for n, v in consts.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in hinted},
    )
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages)
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        out = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"],
            capture_output=True, text=True,
        )  # fmt: skip
    text = out.stderr + out.stdout
    regs, spills = (
        re.search(r"Used (\d+) registers", text),
        re.search(r"(\d+) bytes spill stores", text),
    )
    if regs is None or spills is None:
        raise RuntimeError(f"ptxas said: {text.strip()[-300:]}")
    return int(regs.group(1)), int(spills.group(1)), compiled.metadata.shared


def fwd(BP=64, BN=256, Q=64, warps=4, stages=1, cb=True, store=False, y=True, ns=1) -> tuple:
    consts = dict(FLAGS, HAS_D=True, D_PER_P=False, HAS_INIT=False, WRITE_Y=y, WRITE_YPRE=False,
                  STORE_STATES=store, WRITE_FINAL=True, WRITE_DECAY=False, HAS_CB=cb,
                  CHAIN=False, NS=ns, Q=Q, BP=BP, BN=BN)  # fmt: skip
    return k._ssd_scan_fwd_kernel, consts, warps, stages


def dx(Q=64, BP=64, BNK=128, warps=4, stages=1, cb=False, sums=True) -> tuple:
    consts = dict(FLAGS, HAS_D=True, D_PER_P=False, HAS_CB=cb, SUMS=sums, Q=Q, BP=BP, BNK=BNK,
                  HEADS_FIRST=True)  # fmt: skip
    return k._ssd_dx_bwd_kernel, consts, warps, stages


def dbc(Q=64, BP=64, BNB=128, warps=8, stages=2, sums=True) -> tuple:
    consts = dict(FLAGS, Q=Q, BP=BP, BNB=BNB, WRITE_SUMS=sums)
    return k._ssd_dbc_bwd_kernel, consts, warps, stages


def dstate(Q=64, BP=64, BN=256, warps=4, stages=2, ns=1) -> tuple:
    consts = dict(FLAGS, HAS_DFINAL=False, WRITE_DINIT=True, NS=ns, Q=Q, BP=BP, BN=BN)
    return k._ssd_dstate_bwd_kernel, consts, warps, stages


def y(Q=64, BP=64, BNK=128, warps=4, stages=2, cb=True) -> tuple:
    consts = dict(FLAGS, HAS_D=True, D_PER_P=False, WRITE_YPRE=False, HAS_CB=cb,
                  HEADS_FIRST=True, Q=Q, BP=BP, BNK=BNK)  # fmt: skip
    return k._ssd_chunk_y_kernel, consts, warps, stages


def cb(Q=64, BNK=64, warps=4, stages=2) -> tuple:
    consts = dict(Q=Q, BNK=BNK, PREC="tf32", I64=False)
    return k._chunk_cb_kernel, consts, warps, stages


KERNELS = {"fwd": fwd, "dx": dx, "dbc": dbc, "dstate": dstate, "y": y, "cb": cb}


def _default_ptxas() -> str:
    """The ptxas Triton itself assembles sm_90 code with (bundled; which of its two depends on
    the Triton version), else one on PATH."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError, RuntimeError):
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
        return str(bundled) if bundled.exists() else shutil.which("ptxas") or "ptxas"


def _parse(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    if name not in KERNELS:
        raise SystemExit(f"unknown kernel {name!r} in {spec!r}: use one of {', '.join(KERNELS)}")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = (
            {"True": True, "False": False}.get(value) if value in ("True", "False") else int(value)
        )
    return name, kwargs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", help="KERNEL:KEY=VALUE,... (e.g. fwd:warps=8)")
    parser.add_argument("--ptxas", default=_default_ptxas(), help="ptxas to assemble with")
    args = parser.parse_args(argv)
    print(f"{'launch':40} {'regs':>5} {'spill B':>8} {'smem B':>8}")
    for spec in args.specs:
        name, kwargs = _parse(spec)
        flags = dict(I64=kwargs.pop("i64", False))  # 64-bit offsets (2^31-element tensors)
        flags.update(HAS_SEQ=kwargs.pop("seq", False), HAS_Z=kwargs.pop("z", False))
        # the grid orders used past 65535 programs on an axis: dB/dC's ORDER, the walks' BH_AXIS
        flags.update(ORDER=kwargs.pop("order", 0), BH_AXIS=kwargs.pop("bh", 1))
        fn, consts, warps, stages = KERNELS[name](**kwargs)
        consts = dict(consts, **{k: v for k, v in flags.items() if k in fn.arg_names})
        regs, spills, smem = resources(fn, consts, warps, stages, args.ptxas)
        print(f"{spec:40} {regs:5d} {spills:8d} {smem:8d}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
