"""`hybrid submit` without a cluster: --dry-run output, flags over --set over the recipe, the files
a submission writes (read back and compared with the planned recipes), sweeps, the check of a run
directory that already has checkpoints, and one-line errors with exit status 2."""

import os

import pytest
import torch
import yaml
from launch_helpers import write_recipe

from hybrid.checkpoint.store import save_checkpoint
from hybrid.cli import main
from hybrid.launch.submit import SubmitRequest, plan, run_dir_of, submit, write_files
from hybrid.recipe.recipe import load_recipe
from hybrid.recipe.schema import ConfigError, to_dict


def cli(capsys, *argv):
    code = main(["submit", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_prints_and_writes_nothing(recipe_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, _ = cli(capsys, str(recipe_file), "--dry-run", "--run-dir", str(run_dir))
    assert code == 0
    assert out.startswith("#!/bin/bash\n") and "#SBATCH --partition=debug" in out
    assert "#SBATCH --job-name=hybrid-tiny" in out and "#SBATCH --time=00:30:00" in out
    assert f"HYBRID_RUN_DIRS=({run_dir})" in out
    assert not run_dir.exists()


def test_flags_win_over_set_and_recipe(recipe_file, tmp_path, capsys):
    code, out, _ = cli(
        capsys,
        str(recipe_file),
        "--dry-run",
        "--run-dir",
        str(tmp_path / "r"),
        "--set",
        "cluster.partition=from-set",
        "--set",
        "cluster.qos=from-set",
        "--partition",
        "from-flag",
        "--nodes",
        "3",
        "--gpus-per-node",
        "4",
        "--account",
        "acct",
        "--time",
        "1-00:00:00",
    )
    assert code == 0
    for line in (
        "--partition=from-flag",
        "--qos=from-set",
        "--nodes=3",
        "--gpus-per-node=4",
        "--account=acct",
        "--time=1-00:00:00",
    ):
        assert f"#SBATCH {line}\n" in out
    assert "export HYBRID_PROCS_PER_NODE=4" in out


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--time", "1h"], ["--time", "cluster.time", "not a Slurm time"]),
        (["--partition", "a;id"], ["--partition", "cluster.partition"]),
        (["--nodes", "0"], ["cluster.nodes", "at least 1"]),
        (["--sweep", "train.steps"], ["--sweep expects key.path=v1,v2"]),
        (["--sweep", "cluster.nodes=1,2"], ["cannot differ"]),
        (["--sweep", "train.stepz=1,2"], ["train.stepz", "did you mean 'steps'"]),
        (["--run-dir", "/tmp/a b"], ["run dir", "cannot use the character"]),
        (["--set", "name=my job", "--run-dir", "/tmp/r"], ["'my job'", "cluster.job_name"]),
    ],
)
def test_bad_input_is_one_line_exit_2(recipe_file, capsys, argv, needles):
    code, out, err = cli(capsys, str(recipe_file), "--dry-run", *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybrid submit: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_no_sbatch_is_a_clear_error(recipe_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, _, err = cli(capsys, str(recipe_file), "--run-dir", str(tmp_path / "r"))
    assert code == 2 and "sbatch not found" in err and "--dry-run" in err
    assert not (tmp_path / "r").exists()


def test_written_files_match_the_plan(recipe_file, tmp_path):
    req = SubmitRequest(
        recipe=str(recipe_file), overrides=["train.steps=7"], run_dir=str(tmp_path / "run")
    )
    sub = plan(req)
    script = write_files(sub)
    assert script == sub.job_dir / "job.sbatch" and script.read_text() == sub.script
    assert sub.job_dir.parent == tmp_path / "run" / "slurm"
    (task,) = sub.spec.tasks
    saved = load_recipe(task.recipe_path)
    assert to_dict(saved) == to_dict(sub.recipes[0])
    assert saved.train.steps == 7 and saved.train.run_dir == str(tmp_path / "run")
    assert (tmp_path / "run" / "logs").is_dir()
    assert sub.log_paths() == [tmp_path / "run" / "logs" / "slurm-JOBID.out"]
    again = plan(req)  # a second submission gets its own directory
    write_files(again)
    assert again.job_dir != sub.job_dir and script.read_text() == sub.script


def test_sweep_plan(recipe_file, tmp_path):
    req = SubmitRequest(
        recipe=str(recipe_file),
        sweeps=["model.layout.pattern=M*M*,M-*-", "train.optimizer.lr=1e-3,2e-3"],
        run_dir=str(tmp_path / "sweep"),
    )
    sub = plan(req)
    write_files(sub)
    assert sub.spec.array and len(sub.spec.tasks) == 4
    assert "#SBATCH --array=0-3" in sub.script
    table = yaml.safe_load((sub.job_dir / "sweep.yaml").read_text())
    base = load_recipe(recipe_file)
    for i, (task, row) in enumerate(zip(sub.spec.tasks, table)):
        assert row["task"] == i and row["run_dir"] == str(task.run_dir)
        assert task.run_dir.parent == tmp_path / "sweep" and task.run_dir.name.startswith(f"{i}-")
        got = load_recipe(task.recipe_path)
        assert got.model.layout.pattern == row["values"]["model.layout.pattern"]
        assert got.train.optimizer.lr == float(row["values"]["train.optimizer.lr"])
        # nothing else differs from the base recipe but the swept keys and the run dir
        got.model.layout, got.train.optimizer.lr = base.model.layout, base.train.optimizer.lr
        got.train.run_dir = base.train.run_dir
        assert to_dict(got) == to_dict(base)
    logs = sub.log_paths()
    assert logs[3] == tmp_path / "sweep" / "logs" / "slurm-JOBID_3.out"


def test_run_dir_like_hybrid_train(recipe_file, tmp_path, monkeypatch):
    from hybrid.train.loop import resolve_run_dir

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(recipe_file, ["train.run_dir=runs/{name}-x"])
    assert run_dir_of(recipe, None) == resolve_run_dir(recipe, None).absolute()
    assert run_dir_of(recipe, "~/r") == resolve_run_dir(recipe, "~/r")
    with pytest.raises(ConfigError, match="placeholder"):
        run_dir_of(recipe, "runs/{nam}")


def test_existing_checkpoint_must_be_the_same_model(recipe_file, tmp_path):
    run_dir = tmp_path / "run"
    req = SubmitRequest(recipe=str(recipe_file), run_dir=str(run_dir), dry_run=True)
    recipe = plan(req).recipes[0]
    other = to_dict(recipe)
    other["model"]["d_model"] = 64
    state = {"w": torch.zeros(1)}
    save_checkpoint(run_dir, 3, model_state=state, train_state={}, recipe=other)
    with pytest.raises(ConfigError, match="different model"):
        submit(req)
    save_checkpoint(run_dir, 4, model_state=state, train_state={}, recipe=to_dict(recipe))
    assert submit(req).job_id is None  # same model: the job will resume it


def test_job_python(recipe_file, tmp_path):
    venv = tmp_path / "venv"
    sub = plan(
        SubmitRequest(
            recipe=str(recipe_file), overrides=[f"cluster.venv={venv}"], run_dir=str(tmp_path)
        )
    )
    assert sub.spec.python == str(venv / "bin" / "python")
    assert f"source {venv}/bin/activate" in sub.script
    sub = plan(SubmitRequest(recipe=str(recipe_file), run_dir=str(tmp_path)))
    assert os.path.samefile(sub.spec.python, os.sys.executable)


def test_recipe_without_cluster_section(tmp_path, capsys):
    path = write_recipe(tmp_path / "plain.yaml")
    code, out, _ = cli(capsys, str(path), "--dry-run", "--run-dir", str(tmp_path / "r"))
    assert code == 0 and "#SBATCH --nodes=1" in out and "#SBATCH --partition" not in out
