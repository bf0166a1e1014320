# torchrun on each node: --nproc-per-node training processes, c10d rendezvous on the job's first
# node. Runs as the body of run_node() in slurm/job.sbatch; uses only exported variables.
exec "$HYBRID_PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc-per-node="$HYBRID_PROCS_PER_NODE" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id="$SLURM_JOB_ID" \
    --max-restarts=0 \
    -m hybrid.cli train "$HYBRID_RECIPE" --run-dir "$HYBRID_RUN_DIR"
