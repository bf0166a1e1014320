"""tools/bench_generate.py runs end to end at tiny sizes on CPU: per recipe and context it
reports the cache of the pre-allocated length, Mamba state constant, KV cache linear in it."""

import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_generate.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_generate", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_generate_tiny(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--tiny", "--contexts", "30,94", "--steps", "2", "--warmup", "0", "--json", str(out)]
    assert load_tool().main(argv) == 0
    assert "| bench-hybrid-1b |" in capsys.readouterr().out
    rows = {(r["recipe"], r["context"]): r for r in json.loads(out.read_text())}
    assert len(rows) == 6 and all(r["decode_ms_per_token"] > 0 for r in rows.values())
    for name in ("bench-mamba-1b", "bench-hybrid-1b", "bench-attention-1b"):
        short, long = rows[(name, 30)], rows[(name, 94)]
        assert short["mamba_bytes_per_sequence"] == long["mamba_bytes_per_sequence"]
        assert long["kv_bytes_per_sequence"] == 3 * short["kv_bytes_per_sequence"]  # 96 vs 32
    assert rows[("bench-mamba-1b", 30)]["kv_bytes_per_sequence"] == 0
    assert rows[("bench-attention-1b", 30)]["mamba_bytes_per_sequence"] == 0
