"""`cluster:` section: Slurm time parsing (against hand-computed seconds), defaults, and every
hostile or malformed value rejected with a ConfigError that names the key."""

import pytest

from hybrid.recipe.cluster_config import ClusterConfig, parse_slurm_time
from hybrid.recipe.recipe import recipe_from_dict
from hybrid.recipe.schema import ConfigError


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("30", 30 * 60),
        ("90:15", 90 * 60 + 15),
        ("1:02:03", 3600 + 2 * 60 + 3),
        ("2-00:00:00", 2 * 86400),
        ("1-12", 86400 + 12 * 3600),
        ("1-00:30", 86400 + 30 * 60),
        ("0-0:0:5", 5),
        ("UNLIMITED", None),
        ("infinite", None),
    ],
)
def test_parse_slurm_time(text, seconds):
    assert parse_slurm_time(text) == seconds


@pytest.mark.parametrize("text", ["", "1h", "1:2:3:4", "-5", "0", "00:00:00", "1-", "2 days"])
def test_parse_slurm_time_rejects(text):
    with pytest.raises(ConfigError, match="time"):
        parse_slurm_time(text)


def test_defaults_and_processes_per_node():
    c = ClusterConfig()
    assert (c.nodes, c.gpus_per_node, c.launcher, c.requeue) == (1, 0, "torchrun", True)
    assert c.processes_per_node == 1
    assert ClusterConfig(gpus_per_node=8).processes_per_node == 8
    assert ClusterConfig(gpus_per_node=8, procs_per_node=4).processes_per_node == 4
    assert ClusterConfig(time="1:00:00", signal_seconds=120).time_seconds == 3600


def cluster_error(**cluster) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({"cluster": cluster})
    return info.value


@pytest.mark.parametrize(
    "cluster,key",
    [
        ({"partition": "gpu; rm -rf ~"}, "cluster.partition"),
        ({"partition": "gpu\n#SBATCH --wrap=id"}, "cluster.partition"),
        ({"account": "$(id)"}, "cluster.account"),
        ({"qos": "high `id`"}, "cluster.qos"),
        ({"job_name": "x y"}, "cluster.job_name"),
        ({"job_name": "-x"}, "cluster.job_name"),
        ({"mem": "64GB; id"}, "cluster.mem"),
        ({"time": "1:00:00; id"}, "cluster.time"),
        ({"time": "10:00", "signal_seconds": 600}, "cluster.signal_seconds"),
        ({"signal_seconds": 0}, "cluster.signal_seconds"),
        ({"nodes": 0}, "cluster.nodes"),
        ({"gpus_per_node": -1}, "cluster.gpus_per_node"),
        ({"procs_per_node": 0}, "cluster.procs_per_node"),
        ({"master_port": 80}, "cluster.master_port"),
        ({"max_requeues": -1}, "cluster.max_requeues"),
        ({"launcher": "mpirun"}, "cluster.launcher"),
        ({"modules": ["cuda; id"]}, "cluster.modules[0]"),
        ({"setup": ["ok", "a\nb"]}, "cluster.setup[1]"),
        ({"env": {"BAD NAME": "1"}}, "cluster.env.BAD NAME"),
        ({"env": {"HYBRID_RUN_DIR": "/x"}}, "cluster.env.HYBRID_RUN_DIR"),
        ({"env": {"SLURM_JOB_ID": "1"}}, "cluster.env.SLURM_JOB_ID"),
        ({"venv": "/a\nid"}, "cluster.venv"),
        ({"python": ""}, "cluster.python"),
        ({"sbatch_options": ["--exclusive", "-N 2"]}, "cluster.sbatch_options[1]"),
        ({"sbatch_options": ["--comment=a b"]}, "cluster.sbatch_options[0]"),
        ({"sbatch_options": ["--comment=$(id)"]}, "cluster.sbatch_options[0]"),
        ({"sbatch_options": ["--comment=x\n#SBATCH --wrap=id"]}, "cluster.sbatch_options[0]"),
        ({"sbatch_options": ["--comment='x'"]}, "cluster.sbatch_options[0]"),
        ({"sbatch_options": ["--time=10"]}, "cluster.sbatch_options[0]"),
        ({"sbatch_options": ["--output=/tmp/x"]}, "cluster.sbatch_options[0]"),
        ({"srun_options": ["--mpi=pmix; id"]}, "cluster.srun_options[0]"),
        ({"unknown": 1}, "cluster.unknown"),
    ],
)
def test_bad_values_name_their_key(cluster, key):
    err = cluster_error(**cluster)
    assert err.key == key, str(err)
    assert "\n" not in str(err).replace("\\n", "")


def test_managed_option_says_which_key_to_set():
    err = cluster_error(sbatch_options=["--partition=gpu"])
    assert "cluster.partition" in str(err)


def test_accepted_values():
    c = recipe_from_dict(
        {
            "cluster": {
                "partition": "gpu,gpu-long",
                "time": 90,  # YAML int: minutes
                "mem": "0",
                "job_name": "jamba-1to3.v2",
                "modules": ["cuda/12.4", "nccl/2.21@gcc"],
                "env": {"NCCL_DEBUG": "WARN", "X": 3},
                "sbatch_options": ["--exclusive", "--constraint=a100|h100", "--gres=gpu:4"],
                "srun_options": ["--cpu-bind=none"],
            }
        }
    ).cluster
    assert c.time_seconds == 90 * 60 and c.env == {"NCCL_DEBUG": "WARN", "X": "3"}
