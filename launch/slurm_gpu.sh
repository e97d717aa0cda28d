#!/usr/bin/env bash
# Runs reinit on GPUs of one or more Slurm nodes, one process per GPU (or per node).
#
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm_gpu.sh \
#     --config=configs/benchmark.py:dataset=cifar100,model=resnet50,method=lw \
#     --workdir=/shared/runs/cifar100_lw --config.data_dir=/shared/tensorflow_datasets
#
# One process per node instead: --ntasks-per-node=1 (each process then drives all GPUs of its
# node). Arguments go to `python -m launch.main --distributed`: `jax.distributed.initialize()`
# reads the Slurm environment (nodes, task ids, local GPU of each task), each process feeds
# its slice of every batch, only process 0 writes results and logs. The workdir must be on a
# filesystem all nodes share; a requeued or restarted job resumes from its latest checkpoint.
# Set VENV to a virtualenv holding `pip install -e . 'jax[cuda12]'`. DRY_RUN=1 prints the
# srun command instead of running it (also outside Slurm).
#SBATCH --job-name=reinit
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

if [[ -n "${VENV:-}" ]]; then source "$VENV/bin/activate"; fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
command=(srun --kill-on-bad-exit=1 python -m launch.main --distributed "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "${command[@]}"; echo; else exec "${command[@]}"; fi
