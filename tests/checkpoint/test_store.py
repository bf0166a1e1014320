"""Checkpoints: exact round trip of a realistic training state, layout, `latest`, keep-K pruning,
clear errors for broken checkpoints, RNG capture/restore, and SIGKILL at every phase of a save
(and at random moments) always leaving exactly one complete saved state loadable."""

import importlib.util
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from hybrid.checkpoint.rng import capture_rng_state, restore_rng_state
from hybrid.checkpoint.store import (
    FILES,
    PAUSE_ENV,
    CheckpointError,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from hybrid.recipe.schema import ConfigError

CHILD = Path(__file__).with_name("ckpt_kill_child.py")
_spec = importlib.util.spec_from_file_location("ckpt_kill_child", CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)


def assert_same(a, b, where="state"):
    """Exact structural equality: tensors by torch.equal (and dtype), containers recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.cpu(), b), where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and list(a) == list(b), (where, list(a), list(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


def tiny_state(tag: float = 1.0) -> dict:
    w = torch.full((4, 4), tag)
    return {
        "model_state": {"embed.weight": w, "lm_head.weight": w, "b": torch.arange(3.0) + tag},
        "train_state": {"step": int(tag), "data": {"pos": int(tag)}},
        "recipe": {"name": "t", "tag": tag},
    }


# ----------------------------------------------------------------------------- round trip


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.proj = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 32, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.proj(self.embed(ids))))


def make_training():
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[3])
    return model, opt, sched


def train_steps(model, opt, sched, n):
    losses = []
    for _ in range(n):
        ids = torch.randint(0, 32, (4, 6))
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_round_trip_of_a_realistic_training_state(tmp_path):
    torch.manual_seed(0)
    model, opt, sched = make_training()
    train_steps(model, opt, sched, 2)
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    model_state["lm_head.weight"] = model_state["embed.weight"]  # keep the tie in the snapshot
    model_state["extra.strided"] = torch.arange(24.0).reshape(4, 6)[:, ::2]  # non-contiguous
    model_state["extra.proj_t"] = model_state["proj.weight"].t()  # shares proj.weight's storage
    train_state = {
        "step": 2,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": capture_rng_state(),
        "data": {
            "epoch": 1,
            "sampler": {"consumed": 123, "per_source": {"web": [1, 2], "code": (3,)}},
            "tokens": 10**13,
            "frac": 0.25,
            "done": False,
            "note": None,
        },
    }
    recipe = {"name": "tiny", "model": {"d_model": 8, "pattern": ("M", "*")}, "train": {"lr": 1e-2}}
    path = save_checkpoint(
        tmp_path,
        2,
        model_state=model_state,
        train_state=train_state,
        recipe=recipe,
        meta={"git": "abc123"},
    )

    assert path == tmp_path / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in path.iterdir()) == sorted(FILES)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    raw = torch.load(path / "train_state.pt", weights_only=True)
    assert_same(train_state, raw)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == len(model_state) - 1  # the tied pair stored once

    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == path and ckpt.step == 2 and ckpt.meta["git"] == "abc123"
    assert_same(model_state, ckpt.model_state, "model_state")
    assert_same(train_state, ckpt.train_state, "train_state")
    assert ckpt.recipe == {**recipe, "model": {"d_model": 8, "pattern": ["M", "*"]}}
    assert ckpt.model_state["embed.weight"] is ckpt.model_state["lm_head.weight"]
    assert all(t.device.type == "cpu" for t in ckpt.model_state.values())

    # resuming from it continues exactly like the uninterrupted run
    reference = train_steps(model, opt, sched, 3)
    model2, opt2, sched2 = make_training()
    state = {k: v for k, v in ckpt.model_state.items() if not k.startswith("extra.")}
    model2.load_state_dict(state)
    opt2.load_state_dict(ckpt.train_state["optimizer"])
    sched2.load_state_dict(ckpt.train_state["scheduler"])
    restore_rng_state(ckpt.train_state["rng"])
    assert train_steps(model2, opt2, sched2, 3) == reference
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_train_state_must_load_with_weights_only(tmp_path):
    for bad in (np.zeros(3), {1, 2}, object()):
        state = {**tiny_state(), "train_state": {"data": {"position": bad}}}
        with pytest.raises(TypeError, match=r"train_state\['data'\]\['position'\]"):
            save_checkpoint(tmp_path, 1, **state)
    assert list_checkpoints(tmp_path) == [] and find_latest(tmp_path) is None
    with pytest.raises(ValueError, match="must not set"):
        save_checkpoint(tmp_path, 1, **tiny_state(), meta={"step": 3})


# ----------------------------------------------------------------------------- layout and pruning


def test_keep_latest_listing_and_stale_tmp(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, step, **tiny_state(step), keep=2)
        assert (ckpts / "latest").read_text().strip() == f"step-{step:08d}"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    # resumed from an earlier step: the one `latest` names is never pruned
    save_checkpoint(tmp_path, 3, **tiny_state(3), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step-0000000{i}" for i in (3, 4, 5)]
    assert load_checkpoint(tmp_path).step == 3
    # leftovers of a killed save are ignored by loading and removed by the next save
    (ckpts / ".tmp-step-00000009-dead").mkdir()
    (ckpts / ".tmp-step-00000009-dead" / "model.safetensors").write_bytes(b"partial")
    (ckpts / ".tmp-latest-dead").write_text("step-00000009\n")
    assert find_latest(tmp_path) == ckpts / "step-00000003"
    assert 9 not in [load_checkpoint(p).step for p in list_checkpoints(tmp_path)]
    save_checkpoint(tmp_path, 6, **tiny_state(6), keep=0)  # 0: keep all
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    assert [load_checkpoint(p).step for p in list_checkpoints(tmp_path)] == [3, 4, 5, 6]


def test_list_is_sorted_by_step_and_same_step_resave(tmp_path):
    for step in (10, 9, 100_000_000, 0):
        save_checkpoint(tmp_path, step, **tiny_state(step), keep=10)
    assert [int(p.name[5:]) for p in list_checkpoints(tmp_path)] == [0, 9, 10, 100_000_000]
    save_checkpoint(tmp_path, 10, **tiny_state(77.0), keep=10)  # same step again, new content
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 10 and ckpt.recipe["tag"] == 77.0
    assert torch.equal(ckpt.model_state["b"], torch.arange(3.0) + 77)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_resave_without_atomic_exchange_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    import hybrid.checkpoint.store as ckpt_module

    save_checkpoint(tmp_path, 5, **tiny_state(1.0))
    monkeypatch.setattr(ckpt_module, "_exchange", lambda a, b: False)
    save_checkpoint(tmp_path, 5, **tiny_state(2.0))
    assert "cannot exchange directories atomically" in caplog.text
    assert load_checkpoint(tmp_path).recipe["tag"] == 2.0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step-00000005",
    ]


def test_missing_latest_falls_back_to_the_newest_step_dir(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, **tiny_state(step))
    (tmp_path / "checkpoints" / "latest").unlink()  # as after a kill inside the first save
    assert find_latest(tmp_path) == tmp_path / "checkpoints" / "step-00000002"


def test_pause_hook_format(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PAUSE_ENV, "after_latest@2:0")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, **tiny_state(step))
    err = capsys.readouterr().err
    assert "step 2 paused at after_latest" in err and "step 1 " not in err and "step 3" not in err
    for bad in ("sometime", "after_latest@x", "after_latest:soon"):
        monkeypatch.setenv(PAUSE_ENV, bad)
        with pytest.raises(ValueError, match="PHASE"):
            save_checkpoint(tmp_path, 4, **tiny_state())


def test_no_checkpoint(tmp_path):
    assert find_latest(tmp_path / "missing") is None
    assert find_latest(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    assert find_latest(tmp_path) is None and list_checkpoints(tmp_path) == []
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- errors


def _rewrite(step_dir: Path, name: str, data: bytes, *, keep_size_record: bool = False):
    (step_dir / name).write_bytes(data)
    if not keep_size_record and name != "meta.json":  # make the size table agree
        meta = json.loads((step_dir / "meta.json").read_text())
        meta["files"][name] = len(data)
        (step_dir / "meta.json").write_text(json.dumps(meta))


BREAKAGES = {
    "missing model": (lambda d: (d / "model.safetensors").unlink(), "missing model.safetensors"),
    "truncated": (
        lambda d: _rewrite(d, "train_state.pt", b"x", keep_size_record=True),
        "truncated",
    ),
    "bad pickle": (lambda d: _rewrite(d, "train_state.pt", b"not a pickle"), "unreadable"),
    "bad safetensors": (lambda d: _rewrite(d, "model.safetensors", b"\0" * 64), "unreadable"),
    "bad yaml": (lambda d: _rewrite(d, "recipe.yaml", b"a: [1,"), "unreadable"),
    "yaml not a mapping": (lambda d: _rewrite(d, "recipe.yaml", b"- 1\n"), "expected a mapping"),
    "bad json": (lambda d: _rewrite(d, "meta.json", b"{"), "unreadable"),
    "foreign meta": (lambda d: _rewrite(d, "meta.json", b'{"format": "x"}'), "not a hybrid"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_checkpoint_gives_one_line_error_naming_the_path(tmp_path, breakage):
    step_dir = save_checkpoint(tmp_path, 4, **tiny_state())
    damage, message = BREAKAGES[breakage]
    damage(step_dir)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(tmp_path)
    assert isinstance(err.value, ConfigError) and isinstance(err.value, ValueError)
    assert str(step_dir) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "latest, message",
    [("step-00000099", "does not exist"), ("../etc", "not a step-"), ("", "not a step-")],
)
def test_bad_latest_pointer(tmp_path, latest, message):
    save_checkpoint(tmp_path, 4, **tiny_state())
    pointer = tmp_path / "checkpoints" / "latest"
    pointer.write_text(latest)
    for call in (find_latest, load_checkpoint):
        with pytest.raises(CheckpointError, match=message) as err:
            call(tmp_path)
        assert str(pointer) in str(err.value) and "\n" not in str(err.value)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such") as err:
        load_checkpoint(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)
    step_dir = save_checkpoint(tmp_path / "run", 4, **tiny_state())
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(step_dir / "meta.json")
    assert load_checkpoint(step_dir).step == load_checkpoint(step_dir.parent).step == 4


# ----------------------------------------------------------------------------- RNG


def draws():
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.standard_normal(5),
        torch.rand(4),
        torch.randn(3),
    )


def test_rng_capture_restore_round_trips_exactly():
    random.gauss(0, 1)  # leaves a cached gaussian in python and numpy
    np.random.standard_normal(1)
    state = capture_rng_state()
    expected = draws()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    draws()  # move every generator on
    restore_rng_state(loaded)
    got = draws()
    assert got[0] == expected[0]
    assert np.array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
    with pytest.raises(ValueError, match="lacks"):
        restore_rng_state({"torch": loaded["torch"]})


# ----------------------------------------------------------------------------- SIGKILL


NUMEL = 2_500_000  # about 20 MB of tensors per save
# phase -> whether the state being saved (True) or the previous one (False) must be loadable
EXPECT = {
    "steps": {
        "mid_tmp_write": False,
        "after_tmp_write@3": False,
        "after_rename": False,
        "before_latest": False,
        "after_latest": True,
        "mid_prune": True,
    },
    "resave": {
        "after_tmp_write": False,
        "after_rename": True,
        "before_latest": True,
        "after_latest": True,
    },
}
DELAYS = {"steps": [0.0, 0.15, 0.35, 0.6], "resave": [0.1, 0.45]}


def run_child(run_dir: Path, mode: str, pause: str, delay: float) -> tuple[list[str], int]:
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    env["CHILD_PAUSE"] = pause
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(run_dir), mode, str(NUMEL)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    lines = []
    try:
        marker = "paused at" if pause else "READY"
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if marker in line:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        lines += proc.stdout.read().splitlines()
        return lines, proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check_after_kill(run_dir: Path, lines: list[str], rc: int, expect_new: bool | None):
    out = "\n".join(lines)
    assert rc == -signal.SIGKILL, out
    done = [tuple(map(int, ln.split()[1:])) for ln in lines if ln.startswith("SAVED")]
    started = [tuple(map(int, ln.split()[1:])) for ln in lines if ln.startswith("START")]
    committed = done[-1]
    in_flight = started[-1] if started and started[-1] != committed else None
    allowed = {False: committed, True: in_flight}
    candidates = [allowed[expect_new]] if expect_new is not None else [committed, in_flight]

    ckpt = load_checkpoint(find_latest(run_dir))
    got = (ckpt.train_state["step"], ckpt.train_state["version"])
    assert got in candidates, (got, candidates, out)
    expected = child.make_state(*got, NUMEL)
    assert ckpt.step == got[0] and ckpt.meta["tag"] == expected["meta"]["tag"]
    assert ckpt.recipe == expected["recipe"]
    assert_same(expected["model_state"], ckpt.model_state, "model_state")
    assert_same(expected["train_state"], ckpt.train_state, "train_state")
    for path in list_checkpoints(run_dir):  # every visible step directory is complete
        load_checkpoint(path)
    # the next save clears what the killed one left
    save_checkpoint(run_dir, 999, **tiny_state(), keep=2)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert load_checkpoint(run_dir).step == 999


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_sigkill_during_save_leaves_exactly_one_complete_state(tmp_path):
    trials = [(mode, phase, 0.0, want) for mode, ph in EXPECT.items() for phase, want in ph.items()]
    rnd = random.Random(1234)
    trials += [(mode, "", d + rnd.uniform(0, 0.1), None) for mode, ds in DELAYS.items() for d in ds]
    run_dirs = [tmp_path / f"trial{i}" for i in range(len(trials))]
    with ThreadPoolExecutor(max_workers=len(trials)) as pool:
        results = list(pool.map(lambda t, d: run_child(d, *t[:3]), trials, run_dirs))
    for (mode, phase, delay, want), run_dir, (lines, rc) in zip(trials, run_dirs, results):
        try:
            check_after_kill(run_dir, lines, rc, want)
        except AssertionError as err:
            raise AssertionError(f"trial {mode} {phase or f'delay {delay:.3f}s'}: {err}") from err
