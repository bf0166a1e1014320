"""tools/ssd_roofline.py: its counts agree with the real computations (FLOPs of the chunked
reference counted by torch's FLOP counter; bytes of the tensors the kernels read and write),
and its command line reports bad input in one line."""

from __future__ import annotations

import pytest
import torch
from hybrid_kernels.ssd_ref import ssd_chunked_ref
from torch.utils.flop_counter import FlopCounterMode


@pytest.fixture(scope="module")
def roof(load_tool):
    return load_tool("ssd_roofline")


def _inputs(B: int, L: int, H: int, P: int, G: int, N: int, dtype=torch.bfloat16) -> tuple:
    return (torch.randn(B, L, H, P, dtype=dtype), torch.rand(B, L, H, dtype=dtype),
            -torch.rand(H), torch.randn(B, L, G, N, dtype=dtype),
            torch.randn(B, L, G, N, dtype=dtype))  # fmt: skip


@pytest.mark.parametrize("shape", [(1, 256, 4, 16, 2, 32), (2, 192, 2, 8, 1, 16)])
def test_ideal_forward_flops_are_the_chunked_references(roof, shape) -> None:
    """The matrix products of the Mamba-2 chunked listing at chunk 64 (torch's FLOP counter)
    are what the model counts for one ideal forward pass; bytes are its tensors' bytes."""
    x, dt, A, B, C = _inputs(*shape, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        ssd_chunked_ref(x, dt, A, B, C, chunk_size=roof.Q)
    nbytes, flops = roof.kernels(roof.Sizes(*shape))["ideal fwd"]
    assert flops == counter.get_total_flops()
    x, dt, A, B, C = _inputs(*shape)
    assert nbytes == 2 * x.nbytes + dt.nbytes + B.nbytes + C.nbytes  # x in, y out


def test_state_bytes_are_the_stored_states(roof) -> None:
    """The state walk's traffic beyond its inputs is the per-chunk states tensor the kernel
    stores (Triton interpreter on CPU)."""
    ssd = pytest.importorskip("hybrid_kernels.ssd_triton", reason="triton is not installed")
    shape = (1, 150, 2, 16, 1, 16)
    x, dt, A, B, C = _inputs(*shape)
    _, _, _, states = ssd._scan_fwd(
        x, dt, A, B, C, None, None, None, None, None, False, 0.0, float("inf"),
        write_y=False, write_ypre=False, store_states=True, chunk=roof.Q,
    )  # fmt: skip
    nbytes, _ = roof.kernels(roof.Sizes(*shape))["split: state walk"]
    assert nbytes == x.nbytes + dt.nbytes + B.nbytes + states.nbytes


def test_floor_is_the_larger_bound(roof) -> None:
    assert roof.floor_ms(4.3e9, 1e9, 4.3e12, 788e12) == (pytest.approx(1.0), "memory")
    assert roof.floor_ms(1e6, 788e12, 4.3e12, 788e12) == (pytest.approx(1000.0), "matrix")


def test_table_and_command_line(roof, capsys) -> None:
    assert roof.main(["--shape", "2,8192,256,64,8,256", "--measured", "dx=4.18"]) == 0
    out = capsys.readouterr().out
    assert "| dx | 3.917 |" in out and "4.180 |" in out and "| C B^T |" in out
    assert roof.main(["--gpu", "h100"]) == 0
    assert capsys.readouterr().out.count("B2 L8192 H256") == 1
    for argv, message in [
        (["--shape", "2,8192,256", "--measured", "dx=1"], "six positive integers"),
        (["--shape", "1,2,3,4,5,6", "--measured", "dx"], "expected NAME=MS"),
        (["--shape", "1,2,3,4,5,6", "--measured", "walk=1"], "unknown kernel"),
        (["--measured", "dx=1"], "exactly one --shape"),
    ]:
        with pytest.raises(SystemExit) as err:
            roof.main(argv)
        assert message in str(err.value) + capsys.readouterr().err
