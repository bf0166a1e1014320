"""Launch tuner (`hybrid_kernels._tuning`): the untimed default, picking the fastest, skipping
candidates that do not fit, and the disk cache of choices. Off CUDA, the cache tests time with a
stand-in clock (`_time` returns each candidate's listed cost) on a tuner allowed to time on the
CPU; the GPU tests time real launches."""

from __future__ import annotations

import json
import logging
import multiprocessing
import time

import pytest
import torch

pytest.importorskip("triton")

from hybrid_kernels import _tuning  # noqa: E402
from hybrid_kernels._tuning import LaunchTuner  # noqa: E402

CPU = torch.device("cpu")
CONFIGS = [{"ms": 3.0}, {"ms": 0.5}, {"ms": 1.5, "nested": {"a": 1}}]


class ClockTuner(LaunchTuner):
    """A tuner allowed to time on the CPU whose candidates cost what their "ms" says (None:
    ran out of memory), timing counted in `timed`; `capturing` stands for a CUDA graph capture."""

    def __init__(self, name: str = "t", source: str | None = None) -> None:
        super().__init__(name, source)
        self.timed: list[dict] = []
        self.capturing = False

    def _timeable(self, device: torch.device) -> bool:
        return _tuning.tuning_enabled()

    def _capturing(self, device: torch.device) -> bool:
        return self.capturing

    def _time(self, run, config: dict, required: bool) -> float | None:
        self.timed.append(config)
        return config["ms"]


@pytest.fixture
def cache(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HYBRID_KERNELS_TUNE", "1")
    monkeypatch.setenv("HYBRID_KERNELS_TUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(_tuning, "_WARNED", set())
    return _tuning.tune_cache_path(CPU)


def test_launch_tuner_takes_the_first_config_untimed_off_cuda() -> None:
    calls = []
    tuner = LaunchTuner("test")
    best = tuner.choose("k", [{"a": 1}, {"a": 2}], calls.append, CPU)
    assert best == {"a": 1} and calls == []


def test_launch_tuner_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """HYBRID_KERNELS_TUNE=0 takes the first (heuristic) launch untimed, even on CUDA."""
    monkeypatch.setenv("HYBRID_KERNELS_TUNE", "0")
    calls = []
    best = LaunchTuner("test").choose("k", [{"a": 1}, {"a": 2}], calls.append,
                                      torch.device("cuda"))  # fmt: skip
    assert best == {"a": 1} and calls == []


def test_a_choice_is_stored_and_reused_by_the_next_process(cache, tmp_path) -> None:
    first = ClockTuner(source=__file__)
    assert first.choose((2, 64), CONFIGS, None, CPU) == {"ms": 0.5}
    assert first.timed == CONFIGS
    entries = json.loads(cache.read_text())
    assert list(entries.values()) == [{"ms": 0.5}] and "t | " in next(iter(entries))
    later = ClockTuner(source=__file__)  # another process: nothing in memory
    assert later.choose((2, 64), CONFIGS, None, CPU) == {"ms": 0.5} and later.timed == []
    assert later.choose((4, 64), CONFIGS, None, CPU) == {"ms": 0.5} and later.timed == CONFIGS
    assert len(json.loads(cache.read_text())) == 2  # merged, not overwritten
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [cache.name]


def test_a_stored_choice_no_longer_offered_or_of_other_kernels_is_retuned(cache, tmp_path) -> None:
    ClockTuner(source=__file__).choose("k", CONFIGS, None, CPU)
    changed = [{"ms": 3.0}, {"ms": 1.5, "nested": {"a": 1}}]  # the stored winner is gone
    tuner = ClockTuner(source=__file__)
    assert tuner.choose("k", changed, None, CPU) == changed[1] and tuner.timed == changed
    other = tmp_path / "kernels_v2.py"
    other.write_text("# edited kernels\n")
    tuner = ClockTuner(source=other)  # another version of the kernel file
    assert tuner.choose("k", CONFIGS, None, CPU) == {"ms": 0.5} and tuner.timed == CONFIGS
    assert len(json.loads(cache.read_text())) == 2


def test_a_nested_stored_choice_is_matched(cache) -> None:
    configs = [{"ms": 3.0}, {"ms": 0.1, "nested": {"a": 1, "b": True}}]
    ClockTuner().choose("k", configs, None, CPU)
    tuner = ClockTuner()
    assert tuner.choose("k", configs, None, CPU) is configs[1] and tuner.timed == []


def test_a_corrupt_cache_is_reported_once_and_rewritten(cache, caplog) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text('{"truncated": ')
    with caplog.at_level(logging.WARNING, logger="hybrid_kernels"):
        assert ClockTuner().choose("k", CONFIGS, None, CPU) == {"ms": 0.5}
        cache.write_text("[1, 2]")  # valid JSON, not an object
        assert ClockTuner().choose("k2", CONFIGS, None, CPU) == {"ms": 0.5}
    assert caplog.text.count("unreadable") == 1 and str(cache) in caplog.text
    assert caplog.text.count("not a JSON object") == 0  # one report per file and kind
    assert list(json.loads(cache.read_text()).values()) == [{"ms": 0.5}]
    assert cache.stat().st_mode & 0o044  # readable by others (umask 022), unlike mkstemp's 0600


def test_keys_with_dtypes_and_devices(cache) -> None:
    """Keys may hold dtypes, bools and ints (stored by repr); the in-memory choice is per
    device, the disk one per GPU model (one file)."""
    key = (2, 64, torch.bfloat16, True, None)
    ClockTuner().choose(key, CONFIGS, None, CPU)
    tuner = ClockTuner()
    assert tuner.choose(key, CONFIGS, None, CPU) == {"ms": 0.5} and tuner.timed == []
    assert "torch.bfloat16, True, None)" in next(iter(json.loads(cache.read_text())))
    other = ClockTuner()
    assert other.choose((2, 64, torch.float16, True, None), CONFIGS, None, CPU) == {"ms": 0.5}
    assert other.timed == CONFIGS


def test_processes_tuning_at_once_keep_the_first_stored_choice(cache) -> None:
    """Ranks that time the same shape at once can measure different winners: the second to
    store adopts the first's (so a restart changes no rank's launches)."""
    first, second = ClockTuner(), ClockTuner()
    assert first.choose("k", CONFIGS, None, CPU) == {"ms": 0.5}
    noisy = [{"ms": 3.0}, {"ms": 0.5}, {"ms": 0.1, "nested": {"a": 1}}]  # same configs, new times
    _tuning._write(cache, next(iter(json.loads(cache.read_text()))), noisy[2], noisy)
    assert list(json.loads(cache.read_text()).values()) == [{"ms": 0.5}]
    assert _tuning._write(cache, "t |  | 'k'", {"ms": 3.0}, CONFIGS) is CONFIGS[1]
    assert second.choose("k", CONFIGS, None, CPU) == {"ms": 0.5}


def test_an_out_of_memory_skip_is_not_stored(cache) -> None:
    """A candidate skipped for running out of memory may fit another time: the choice holds
    for this process only."""
    configs = [{"ms": 3.0}, {"ms": None}, {"ms": 1.0}]
    tuner = ClockTuner()
    assert tuner.choose("k", configs, None, CPU) == {"ms": 1.0}
    assert not cache.exists() and tuner.choose("k", configs, None, CPU) == {"ms": 1.0}
    assert len(tuner.timed) == 3  # remembered in memory


def test_a_capture_uses_a_stored_choice_but_never_times(cache) -> None:
    tuner = ClockTuner()
    tuner.capturing = True
    assert tuner.choose("k", CONFIGS, None, CPU) == CONFIGS[0] and tuner.timed == []
    ClockTuner().choose("k", CONFIGS, None, CPU)  # stored by another process
    assert tuner.choose("k", CONFIGS, None, CPU) == {"ms": 0.5} and tuner.timed == []


def test_a_config_json_cannot_hold_is_not_stored(cache) -> None:
    configs = [{"ms": 3.0}, {"ms": 0.5, "shape": (1, 2)}]  # a tuple comes back as a list
    assert ClockTuner().choose("k", configs, None, CPU) is configs[1]
    assert not cache.exists()


def test_an_unwritable_cache_never_fails_the_run(tmp_path, monkeypatch, caplog) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("HYBRID_KERNELS_TUNE", "1")
    monkeypatch.setenv("HYBRID_KERNELS_TUNE_CACHE", str(blocker / "cache"))  # under a file
    monkeypatch.setattr(_tuning, "_WARNED", set())
    tuner = ClockTuner()
    with caplog.at_level(logging.WARNING, logger="hybrid_kernels"):
        assert tuner.choose("k", CONFIGS, None, CPU) == {"ms": 0.5}
        assert tuner.choose("k2", CONFIGS, None, CPU) == {"ms": 0.5}
    assert caplog.text.count("not written") == 1  # reported once
    assert tuner.choose("k", CONFIGS, None, CPU) == {"ms": 0.5} and len(tuner.timed) == 6


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HYBRID_KERNELS_TUNE", "1")
    monkeypatch.setenv("HYBRID_KERNELS_TUNE_CACHE", "0")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _tuning.tune_cache_path(CPU) is None
    for _ in range(2):  # two processes: both time
        tuner = ClockTuner()
        assert tuner.choose("k", CONFIGS, None, CPU) == {"ms": 0.5} and tuner.timed == CONFIGS
    assert list(tmp_path.iterdir()) == []


def test_tuning_off_takes_the_default_without_the_cache(cache, monkeypatch) -> None:
    ClockTuner().choose("k", CONFIGS, None, CPU)
    monkeypatch.setenv("HYBRID_KERNELS_TUNE", "0")
    tuner = ClockTuner()
    assert tuner.choose("k", CONFIGS, None, CPU) == CONFIGS[0] and tuner.timed == []


def test_the_default_folder(tmp_path, monkeypatch, caplog) -> None:
    """$XDG_CACHE_HOME/hybrid_kernels when it is an absolute path, else ~/.cache/...; no home
    folder at all turns the cache off with a warning, not an error."""
    monkeypatch.delenv("HYBRID_KERNELS_TUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = _tuning.tune_cache_path(CPU)
    assert path.parent == tmp_path / "hybrid_kernels" and path.name.startswith("tune-cpu-triton")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", unset)
        assert (
            _tuning.tune_cache_path(CPU).parent == tmp_path / "home" / ".cache" / "hybrid_kernels"
        )

    def no_home() -> None:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(_tuning.Path, "home", no_home)
    monkeypatch.setattr(_tuning, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="hybrid_kernels"):
        assert _tuning.tune_cache_path(CPU) is None
    assert "HYBRID_KERNELS_TUNE_CACHE" in caplog.text


def test_a_held_lock_delays_a_write_only_so_long(cache, caplog) -> None:
    import fcntl

    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_name(cache.name + ".lock"), "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another process holding it (a separate open)
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="hybrid_kernels"), _tuning._locked(
            cache, wait_s=0.3
        ):  # fmt: skip
            waited = time.monotonic() - start
    assert 0.3 <= waited < 5 and "still locked" in caplog.text


def _write_many(args: tuple[str, int]) -> None:
    folder, worker = args
    import os

    os.environ["HYBRID_KERNELS_TUNE_CACHE"] = folder
    path = _tuning.tune_cache_path(CPU)
    for i in range(15):
        _tuning._write(path, f"w{worker} {i}", {"i": i}, [{"i": i}])


def test_processes_writing_at_once_merge_their_choices(tmp_path) -> None:
    """Ranks of one node tuning at the same time: every choice lands, the file stays valid."""
    with multiprocessing.get_context("fork").Pool(3) as pool:
        pool.map(_write_many, [(str(tmp_path), w) for w in range(3)])
    files = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    assert len(files) == 1 and len(json.loads(files[0].read_text())) == 45


@pytest.mark.gpu
def test_launch_tuner_skips_candidates_that_do_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate that runs out of memory or of shared memory is skipped (the default is
    kept); the default itself failing is an error, not a silent choice."""
    from triton.runtime.errors import OutOfResources

    def run(cfg: dict) -> None:
        if cfg["fail"] == "smem":
            raise OutOfResources(300000, 232448, "shared memory")
        if cfg["fail"] == "oom":
            raise torch.OutOfMemoryError("test")
        torch.cuda._sleep(1000)

    monkeypatch.setenv("HYBRID_KERNELS_TUNE", "1")
    monkeypatch.setenv("HYBRID_KERNELS_TUNE_CACHE", "0")  # both calls must time
    configs = [{"fail": None}, {"fail": "smem"}, {"fail": "oom"}]
    assert LaunchTuner("t").choose("k", configs, run, torch.device("cuda")) == {"fail": None}
    with pytest.raises(torch.OutOfMemoryError):
        LaunchTuner("t").choose("k", configs[::-1], run, torch.device("cuda"))


@pytest.mark.gpu
def test_launch_tuner_picks_the_fastest_and_remembers(cache) -> None:
    calls = []

    def run(cfg: dict) -> None:
        calls.append(cfg["ms"])
        time.sleep(cfg["ms"] / 1e3)
        torch.cuda._sleep(1000)

    cuda = torch.device("cuda")
    tuner = LaunchTuner("test")
    configs = [{"ms": 3.0}, {"ms": 0.0}, {"ms": 1.5}]
    assert tuner.choose("k", configs, run, cuda) == {"ms": 0.0}
    n = len(calls)
    built = []

    def lazy() -> list[dict]:  # configs may come from a callable, built on first use only
        built.append(1)
        return configs

    assert tuner.choose("k", lazy, run, cuda) == {"ms": 0.0}
    assert len(calls) == n and not built  # remembered, not timed again
    assert tuner.choose("k2", lazy, run, cuda) == {"ms": 0.0} and built
    m = len(calls)
    assert LaunchTuner("test").choose("k", configs, run, cuda) == {"ms": 0.0}  # a new process
    assert len(calls) == m  # read from the cache file of this GPU model, not timed
    path = _tuning.tune_cache_path(cuda)
    assert torch.cuda.get_device_name(cuda).split()[-1] in path.name and path.exists()
