"""The megatron backend on CPU (gloo, 2 processes) against single-device references.

1. `megatron_driver.py` (one launch): a tiny hybrid with attention, Mamba-2, MLP and MoE layers
   at TP=2 (untied; tied with GQA, biases and QK-norm), EP=2 (DP=2) and TP=2 with sequence
   parallelism (and, in a 4-process launch, TP=2 x EP=2 with it): forward logits, loss, every
   canonical gradient and the gradient norm equal the single-device model's. Tolerance:
   relative 1e-5 in fp32 (reduction order differs). Three steps through megatron's DDP and
   distributed optimizer equal the backend's plain optimizer path.
2. `deepspeed_driver.py` (one launch; it runs `hybrid.train.loop.train`, whatever the backend):
   `recipes/debug/hybrid-tiny-megatron.yaml` trains 4 steps at TP=2 and at EP=2, and a TP=2 run
   stops at step 2 and resumes. References: the same recipe on one process with the local
   backend (relative 1e-4 on per-step losses: a few steps of Adam amplify rounding
   differences), the uninterrupted run for the resume (relative 1e-6), and the local backend
   resuming the TP=2 run's canonical checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from hybrid.checkpoint.store import load_checkpoint  # noqa: E402
from hybrid.parallel.megatron_backend import MegatronBackend  # noqa: E402
from hybrid.recipe.recipe import load_recipe  # noqa: E402
from hybrid.recipe.schema import ConfigError  # noqa: E402
from hybrid.train.loop import train  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
RECIPE = ROOT / "recipes" / "debug" / "hybrid-tiny-megatron.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
GRAD_TOL, LOSS_TOL = 1e-5, 1e-4
STEPS = 4
COMMON = [
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=2",
    "train.seq_len=128",
]
CASES = ["tp2", "tp2_tied", "ep2", "sp2"]
DISTOPT = ["distopt_ep2", "distopt_tp2"]


def launch(args: list[str], cwd: Path, nproc: int = 2) -> None:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}
    cmd = [*TORCHRUN[:-1], str(nproc), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("megatron_eq")
    launch([str(HERE / "megatron_driver.py"), str(base / "out.json"), *CASES, *DISTOPT], base)
    return json.loads((base / "out.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_sharded_forward_and_gradients_equal_single_device(equivalence, case):
    errors = equivalence[case]
    assert errors["loss"] < GRAD_TOL and errors["norm"] < GRAD_TOL
    assert errors["logits"] < GRAD_TOL
    worst = max(errors["grads"], key=errors["grads"].get)
    assert errors["grads"][worst] < GRAD_TOL, (worst, errors["grads"][worst])


@pytest.mark.slow
def test_tp2_ep2_sequence_parallel_on_4_processes(tmp_path):
    """TP=2 x DP=2 with sequence parallelism, the experts split over the data-parallel ranks
    (megatron's expert-parallel group when the expert tensor-parallel size is tp) and each
    expert's hidden size over TP; the sharded checkpoint consolidates to the canonical state."""
    launch([str(HERE / "megatron_driver.py"), str(tmp_path / "out.json"), "tp2_ep2"], tmp_path, 4)
    results = json.loads((tmp_path / "out.json").read_text())
    test_sharded_forward_and_gradients_equal_single_device(results, "tp2_ep2")
    # expert tensor parallelism inside expert parallelism: both marks, and dist_checkpointing
    # stores the EP x TP grid of pieces so that consolidation gives the canonical tensors
    experts = {f"layers.3.mixer.experts.{w}" for w in ("gate_proj", "up_proj", "down_proj")}
    assert set(results["tp2_ep2"]["nested"]) == experts
    assert results["tp2_ep2"]["checkpoint"] == 0.0


def test_what_is_sharded(equivalence):
    tp = set(equivalence["tp2"]["sharded"])
    for name in ("embed.weight", "lm_head.weight", "layers.0.mixer.in_proj.weight"):
        assert name in tp
    assert "layers.0.mixer.conv1d.weight" in tp and "layers.1.mixer.o_proj.weight" in tp
    assert "layers.0.mixer.norm.weight" in tp  # Mamba's gated norm, by groups
    experts = {f"layers.3.mixer.experts.{w}" for w in ("gate_proj", "up_proj", "down_proj")}
    assert experts <= tp  # expert tensor parallelism: each expert's hidden size over TP
    assert {f"layers.3.mixer.shared_experts.{w}_proj.weight" for w in ("gate", "up", "down")} <= tp
    replicated = ("router", "layers.0.norm.", "norm_f.")
    assert not any(word in n for n in tp for word in replicated)
    ep = set(equivalence["ep2"]["sharded"])
    assert ep == experts


@pytest.mark.parametrize("case", DISTOPT)
def test_distributed_optimizer_matches_the_plain_path(equivalence, case):
    """megatron DDP + distributed optimizer (on the CPU through the driver's shims), 3 steps."""
    errors = equivalence[case]
    assert errors["norms"] < GRAD_TOL and errors["moments"] < 1e-4, errors
    assert errors["weights"] < GRAD_TOL and errors["round_trip"] == 0.0, errors


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def assert_close(a: list[float], b: list[float], tol: float) -> None:
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= tol * abs(y), (a, b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("megatron_train")
    tp2 = [*COMMON, "parallel.tp=2"]
    plan = {
        "recipe": str(RECIPE),
        "runs": [
            {"run_dir": str(base / "tp2"), "set": tp2},
            {"run_dir": str(base / "ep2"), "set": [*COMMON, "parallel.ep=2"]},
            {"run_dir": str(base / "tp2_resumed"), "set": tp2, "stop_at_step": 2},
            {"copy": [str(base / "tp2_resumed"), str(base / "tp2_stopped")]},
            {"run_dir": str(base / "tp2_resumed"), "set": tp2},
        ],
    }
    (base / "plan.json").write_text(json.dumps(plan))
    launch([str(HERE / "deepspeed_driver.py"), str(base / "plan.json")], base)
    local = load_recipe(RECIPE, [*COMMON, "parallel.backend=local"])
    train(local, run_dir=str(base / "local"))
    return base


def test_tp2_training_matches_one_process(runs):
    assert_close(losses(runs / "tp2"), losses(runs / "local"), LOSS_TOL)


def test_ep2_training_matches_one_process(runs):
    assert_close(losses(runs / "ep2"), losses(runs / "local"), LOSS_TOL)


def test_tp2_resume_is_exact(runs):
    assert_close(losses(runs / "tp2_resumed")[-2:], losses(runs / "tp2")[-2:], 1e-6)


def test_tp2_checkpoint_is_canonical_and_resumes_locally(runs):
    ckpt = load_checkpoint(runs / "tp2" / "checkpoints")
    local = load_checkpoint(runs / "local" / "checkpoints")
    assert ckpt.model_state.keys() == local.model_state.keys()
    for key, value in local.model_state.items():
        assert ckpt.model_state[key].shape == value.shape, key
    # the local backend resumes the TP=2 run's step-2 checkpoint and finishes as TP=2 did
    train(
        load_recipe(RECIPE, [*COMMON, "parallel.backend=local"]), run_dir=str(runs / "tp2_stopped")
    )
    assert_close(losses(runs / "tp2_stopped")[-2:], losses(runs / "tp2")[-2:], LOSS_TOL)


def test_layout_errors_name_the_key(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="not a multiple") as err:
        MegatronBackend(tp=4, device="cpu")
    assert err.value.key == "parallel.tp"
    with pytest.raises(ConfigError) as err:
        MegatronBackend(tp=2, ep=2, device="cpu")
    assert err.value.key == "parallel.ep"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as err:
            MegatronBackend(tp=2, sequence_parallel=True, device="cpu")
        assert err.value.key == "parallel.sequence_parallel"


def test_recipe_keys_need_the_megatron_backend():
    with pytest.raises(ConfigError) as err:
        load_recipe(RECIPE, ["parallel.backend=local", "parallel.tp=2"])
    assert err.value.key.endswith("parallel.tp")
    with pytest.raises(ConfigError) as err:
        load_recipe(RECIPE, ["parallel.sequence_parallel=true"])
    assert err.value.key.endswith("sequence_parallel")


def test_tp_must_divide_the_model():
    from hybrid.model.lm import build_model
    from hybrid.parallel.tensor_parallel import validate_tp

    cfg = load_recipe(RECIPE).model
    validate_tp(cfg, 2)
    with pytest.raises(ConfigError, match="n_groups") as err:
        validate_tp(cfg, 4)  # 2 Mamba groups
    assert err.value.key == "parallel.tp"
    assert build_model(cfg, device="meta").num_params() > 0


@pytest.mark.gpu
def test_sequence_parallel_and_distributed_optimizer_on_gpu(tmp_path):
    """Sequence parallelism and megatron's DDP + distributed optimizer without the CPU shims:
    on CUDA (NCCL), 2 GPUs, fp32 without TF32."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = tmp_path / "out.json"
    launch([str(HERE / "megatron_driver.py"), str(out), "sp2", *DISTOPT], tmp_path)
    results = json.loads(out.read_text())
    errors = results["sp2"]
    assert max(errors["grads"].values()) < GRAD_TOL and errors["loss"] < GRAD_TOL
    for case in DISTOPT:
        test_distributed_optimizer_matches_the_plain_path(results, case)


@pytest.mark.gpu
def test_training_on_two_gpus(tmp_path, monkeypatch):
    """`hybrid.train.loop.train` on 2 GPUs (fp32): TP=2 with sequence parallelism stops at
    step 2 and resumes from the dist_checkpointing files (`megatron/` in the step directory)
    exactly; TP=2 with megatron's distributed optimizer, EP=2, and PP=2 (1F1B, with evaluation
    through the forward-only schedule) match TP=2's losses; a PP=2 run stopped at step 2
    resumes exactly, and its canonical checkpoint resumes at TP=2."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    gpu = [*COMMON, "train.device=cuda", "train.precision=fp32"]
    tp2 = [*gpu, "parallel.tp=2", "parallel.sequence_parallel=true"]
    pp2 = [*gpu, "parallel.pp=2", "train.eval_every=2"]
    plan = {
        "recipe": str(RECIPE),
        "runs": [
            {"run_dir": str(tmp_path / "tp2"), "set": tp2},
            {"run_dir": str(tmp_path / "resumed"), "set": tp2, "stop_at_step": 2},
            {"run_dir": str(tmp_path / "resumed"), "set": tp2},
            {
                "run_dir": str(tmp_path / "distopt"),
                "set": [*gpu, "parallel.ep=2", "parallel.distributed_optimizer=true"],
            },
            {"run_dir": str(tmp_path / "ep2"), "set": [*gpu, "parallel.ep=2"]},
            {"run_dir": str(tmp_path / "pp2"), "set": pp2},
            {"run_dir": str(tmp_path / "pp2_resumed"), "set": pp2, "stop_at_step": 2},
            {"copy": [str(tmp_path / "pp2_resumed"), str(tmp_path / "pp2_to_tp2")]},
            {"run_dir": str(tmp_path / "pp2_resumed"), "set": pp2},
            {"run_dir": str(tmp_path / "pp2_to_tp2"), "set": tp2},
        ],
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")  # fp32 matmuls in the launched ranks
    launch([str(HERE / "deepspeed_driver.py"), str(tmp_path / "plan.json")], tmp_path)
    assert (tmp_path / "resumed" / "checkpoints" / "step-00000002" / "megatron").is_dir()
    assert_close(losses(tmp_path / "resumed")[-2:], losses(tmp_path / "tp2")[-2:], 1e-6)
    assert_close(losses(tmp_path / "distopt"), losses(tmp_path / "ep2"), LOSS_TOL)
    assert_close(losses(tmp_path / "ep2"), losses(tmp_path / "tp2"), LOSS_TOL)
    assert_close(losses(tmp_path / "pp2"), losses(tmp_path / "tp2"), LOSS_TOL)
    assert_close(losses(tmp_path / "pp2_resumed")[-2:], losses(tmp_path / "pp2")[-2:], 1e-6)
    assert_close(losses(tmp_path / "pp2_to_tp2")[-2:], losses(tmp_path / "tp2")[-2:], LOSS_TOL)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "pp2" / "tensorboard"))
    events.Reload()
    val = [e.value for e in events.Scalars("val/loss")]
    assert len(val) == STEPS // 2 and all(math.isfinite(v) for v in val), val
