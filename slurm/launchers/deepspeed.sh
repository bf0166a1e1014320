# The DeepSpeed launcher on each node without ssh (--no_ssh): every node starts its own
# processes, with its node rank from Slurm and a hostfile of the job's nodes written locally.
# Runs as the body of run_node() in slurm/job.sbatch; uses only exported variables.
hostfile="${TMPDIR:-/tmp}/hybrid-hostfile-$SLURM_JOB_ID-$SLURM_NODEID"
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$HYBRID_PROCS_PER_NODE/" >"$hostfile"
exec "$HYBRID_PYTHON" -m deepspeed.launcher.runner \
    --hostfile="$hostfile" \
    --no_ssh \
    --node_rank="$SLURM_NODEID" \
    --num_nodes="$SLURM_JOB_NUM_NODES" \
    --num_gpus="$HYBRID_PROCS_PER_NODE" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$MASTER_PORT" \
    --no_local_rank \
    --module hybrid.cli train "$HYBRID_RECIPE" --run-dir "$HYBRID_RUN_DIR"
