"""Which kernel makes the fp64 Mamba-2 mixer differ from its PyTorch references on a GPU.

    python tools/diag_mixer_fp64.py        # on a CUDA machine

tests/kernels/test_conv1d_triton.py::test_mamba2_mixer_on_the_kernels_matches_reference failed
on GPUs (fp64 gradients off by ~1e-8 absolute). This runs the same mixer with conv1d and the
gated RMSNorm each on the Triton kernel or the reference in turn and prints the largest
difference of y and of every parameter gradient against the all-reference run.

The cause found on the CPU machine (session 9): Triton's GPU launcher passes a plain Python
float argument as fp32, so the norm kernels' eps was 1e-5 rounded to fp32; the reference with
that eps gives the same differences (y 2.1e-10, gradients 5e-9 to 3e-8). The kernels now declare
eps fp64; on a GPU every row here should read <= 1e-12.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "tests" / "kernels")]

from test_conv1d_triton import seq_idx_for  # noqa: E402

from hybrid.model.context import ForwardContext  # noqa: E402
from hybrid.model.mamba2 import Mamba2Mixer  # noqa: E402
from hybrid.recipe.blocks import Mamba2Config  # noqa: E402

SPECS = [
    "causal_conv1d=torch,gated_rmsnorm=torch",
    "causal_conv1d=triton,gated_rmsnorm=torch",
    "causal_conv1d=torch,gated_rmsnorm=triton",
    "causal_conv1d=triton,gated_rmsnorm=triton",
]


def run(mixer: Mamba2Mixer, u: torch.Tensor, seq_idx: torch.Tensor, spec: str) -> tuple:
    """y and the parameter gradients of sum(y^2) with the op implementations in `spec`."""
    os.environ["HYBRID_OPS_IMPL"] = spec
    mixer.zero_grad(set_to_none=True)
    states = {mixer.layer_idx: mixer.empty_state(u.shape[0], device=u.device, dtype=u.dtype)}
    y, _ = mixer(u, ForwardContext(seq_idx=seq_idx, states=states))
    y.square().sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in mixer.named_parameters()}


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the mismatch does not show on the CPU interpreter)")
    torch.manual_seed(0)
    mixer = Mamba2Mixer(Mamba2Config(d_state=8, head_dim=8, chunk_size=8, n_groups=2), 16)
    mixer.init_weights(0.2, 0.2)
    mixer = mixer.to(device="cuda", dtype=torch.float64)
    u = torch.randn(2, 13, 16, dtype=torch.float64, device="cuda")
    seq_idx = seq_idx_for(2, 13).to("cuda")
    y0, g0 = run(mixer, u, seq_idx, SPECS[0])
    for spec in SPECS:
        y, g = run(mixer, u, seq_idx, spec)
        diffs = ", ".join(f"{n} {(g[n] - g0[n]).abs().max().item():.1e}" for n in g0)
        print(f"{spec}: y {(y - y0).abs().max().item():.1e}; grads {diffs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
