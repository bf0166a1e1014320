"""The Triton kernels compile for an H100 (sm_90) on this CPU machine: Triton's own compiler
lowers them to PTX and its bundled ptxas assembles it, outside the interpreter (which runs the
other kernel tests and accepts code the GPU compiler rejects, e.g. a constexpr branch returning
int64 on one side and int32 on the other). Each check runs in a subprocess without
TRITON_INTERPRET, since kernels decorated under the interpreter cannot be compiled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[2]
nvidia = pytest.importorskip("triton.backends.nvidia.compiler", reason="no NVIDIA backend")
PTXAS = Path(nvidia.get_ptxas(90).path)  # the ptxas Triton uses for sm_90 (bundled)
pytestmark = pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is missing")

# The launches the ops use at N = 256 and N = 128 (forward walk with its state in halves or
# whole, the backward's state walks, dx and dB/dC with and without the state sums, the split
# forward's y kernel, the C B^T kernel), the 64-bit offset variants taken for tensors of 2^31
# elements or more, packed documents with the z gate, and the grid orders taken past 65535
# programs on an axis.
SSD_LAUNCHES = [
    "fwd:ns=2", "fwd:BN=128,stages=2", "fwd:store=True,y=False,cb=False,stages=2,ns=2",
    "dstate:", "dx:", "dx:sums=False,BNK=64", "dbc:", "dbc:sums=False", "y:", "y:cb=False",
    "y:Q=128,warps=8,BNK=64",
    "fwd:ns=2,i64=True", "dstate:i64=True", "dx:i64=True", "dbc:i64=True", "y:i64=True",
    "cb:", "cb:i64=True", "fwd:ns=2,seq=True,z=True", "dstate:seq=True,z=True",
    "dx:seq=True,z=True", "dbc:seq=True,z=True", "y:seq=True,z=True",
    "dbc:order=1", "dbc:order=2,i64=True", "fwd:ns=2,bh=0", "dstate:bh=0",
]  # fmt: skip
H100_SMEM = 232448  # bytes of shared memory one program may use on an H100 (227 KB)

NORM_CHECK = """
import re, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hybrid_kernels import rmsnorm_triton as k
for fn in (k._gated_rmsnorm_fwd_kernel, k._gated_rmsnorm_bwd_kernel):
    names = fn.arg_names
    for acc, ptr in ((tl.float64, "*fp64"), (tl.float32, "*fp32")):
        consts = dict(HAS_Z=True, HAS_W=True, NORM_BEFORE_GATE=False, ACC=acc, BM=4, BS=16,
                      NC=1, ITERS=1)
        consts = {n: v for n, v in consts.items() if n in names}
        sig = {n: "constexpr" if n in consts else ptr if n.endswith("_ptr") else
               fn.params[i].annotation_type or "i32" for i, n in enumerate(names)}
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(names.index(n),): v for n, v in consts.items()})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        i = names.index("eps")
        print(fn.__name__, acc, re.search(rf"\\.param \\.(\\w+) \\w+_param_{i}\\b", ptx).group(1))
"""


def _run(args: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "kernels"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_ssd_kernels_compile_and_assemble_for_sm90() -> None:
    """Each launch compiles with this machine's Triton (CI's; the GPU image has its own) and
    fits an H100's shared memory."""
    stdout = _run(["tools/ssd_registers.py", "--ptxas", str(PTXAS), *SSD_LAUNCHES])
    rows = [line.split() for line in stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == SSD_LAUNCHES
    for spec, _regs, _spills, smem in rows:  # (ptxas caps registers at 255 by spilling)
        assert int(smem) <= H100_SMEM, spec


def test_rmsnorm_kernels_take_eps_as_fp64_on_the_gpu() -> None:
    """The compiled kernels' eps parameter is a double (a plain float argument would be fp32:
    eps rounded, fp64 results off by ~1e-12 relative), for fp64 and fp32 inputs alike."""
    stdout = _run(["-c", NORM_CHECK])
    lines = stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.endswith(" f64") for line in lines), stdout
