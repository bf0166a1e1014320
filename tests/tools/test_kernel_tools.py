"""The kernel tools run on the CPU (Triton's interpreter) at tiny shapes, so a change to the
kernels' launchers cannot silently break the commands a GPU session runs: tools/bench_kernels.py
--tiny (ours and the PyTorch reference side by side, det check), tools/bench_kernels_parts.py
--tiny (conv1d, gated RMSNorm) and tools/tune_ssd.py --device
cpu (every kernel's default launch, and one sweep's candidates)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("hybrid_kernels.ssd_triton", reason="triton is not installed")


def test_bench_kernels_tiny(load_tool, tmp_path, capsys) -> None:
    out = tmp_path / "rows.json"
    assert load_tool("bench_kernels").main(["--tiny", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["impl"] for r in rows} == {"hybrid (triton)", "pytorch reference c256"}
    ours = next(r for r in rows if r["impl"] == "hybrid (triton)")
    assert ours["fwd_ms"] > 0 and ours["fwdbwd_ms"] > 0 and ours["note"] == "det=True"
    assert "| (2, 100, 4, 16, 2, 16) | hybrid (triton) |" in capsys.readouterr().out


def test_tune_ssd_on_the_interpreter(load_tool, capsys) -> None:
    tune = load_tool("tune_ssd")
    shape = ["--device", "cpu", "--shape", "1,80,2,16,1,16"]
    assert tune.main([*shape, "--no-sweep"]) == 0
    out = capsys.readouterr().out
    for name in ("fwd y", "split y", "bwd states", "dstates", "dx", "dB dC", "dx+dB dC"):
        assert f"{name}: default " in out
    assert tune.main([*shape, "--only", "dx+dB dC"]) == 0
    out = capsys.readouterr().out
    assert "failed" not in out  # every candidate ran
    best = out.splitlines()[-1]
    assert best.startswith("dx+dB dC: ") and best.count("state_sums") == 3  # the top three


def test_bench_kernels_parts_tiny(load_tool, tmp_path) -> None:
    out = tmp_path / "rows.json"
    assert (
        load_tool("bench_kernels_parts").main(["--tiny", "--no-reference", "--json", str(out)]) == 0
    )
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} == {"conv", "norm"}
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in rows)


def test_bench_kernels_ratio_lines_give_the_floor(load_tool, capsys) -> None:
    bench = load_tool("bench_kernels")
    assert [bench.gpu_ceilings(n) for n in ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "A100")] == [
        "h200",
        "h100",
        None,
    ]
    shape = str((2, 8192, 256, 64, 8, 256))
    rows = [bench.Row(shape, "hybrid (triton)", 3.183, 13.017, 0, 0),
            bench.Row(shape, "mamba_ssm c256", 3.092, 12.925, 0, 0)]  # fmt: skip
    bench.print_table(rows, "h200")
    line = capsys.readouterr().out.splitlines()[-1]
    assert "fwd 1.03x, fwd+bwd 1.01x" in line and "fwd 8.0x of 0.398 ms" in line
    assert "fwd+bwd 10.9x of 1.194 ms" in line
