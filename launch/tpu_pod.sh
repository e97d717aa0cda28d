#!/usr/bin/env bash
# Runs reinit on a Cloud TPU VM pod slice: one big run across all hosts, or a sweep whose runs
# the hosts share.
#
#   export TPU_NAME=reinit-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 \
#          RUNTIME=tpu-ubuntu2204-base REPO=https://github.com/you/reinit.git
#   launch/tpu_pod.sh create              # create the pod slice
#   launch/tpu_pod.sh setup               # on every host: Python 3.11 venv, the repo, jax[tpu]
#   launch/tpu_pod.sh run --config=configs/benchmark.py:dataset=cifar10,model=resnet18,method=lw \
#       --workdir=gs://BUCKET/runs/cifar10_lw --config.data_dir=gs://BUCKET/tensorflow_datasets
#   HOSTS=4 launch/tpu_pod.sh sweep --config=configs/paper.py:study=full \
#       --workdir=gs://BUCKET/runs/full --config.data_dir=gs://BUCKET/tensorflow_datasets
#   launch/tpu_pod.sh delete              # delete the pod slice
#
# setup: the runtime image's Python is 3.10 and reinit needs 3.11 or newer, so every host gets
# a virtualenv ($VENV, default ~/reinit-venv) of Python $PYTHON_VERSION (default 3.11) made by
# uv (`pip install uv`, then `uv venv --python 3.11`, which fetches a standalone CPython build;
# nothing from the image's Python is used), and the repo installed into it with jax[tpu].
#
# Two modes:
# - run: ONE run across the whole pod (large datasets, big models). Its arguments go to
#   `python -m launch.main --distributed` on every host (--worker=all):
#   `jax.distributed.initialize()` finds the pod's hosts by itself, each host feeds its slice
#   of every batch, only host 0 writes results and logs.
# - sweep: MANY runs, each host runs its share of a sweep on its own chips (the study's small
#   datasets, where one run cannot use a pod). Host w runs `python -m launch.sweep
#   --task_index=w --num_tasks=$HOSTS ARGS`: runs i with i % HOSTS == w, one after another,
#   skipping finished ones. HOSTS is the number of TPU VMs of the slice (v4-32: 4); each host is
#   made a JAX runtime of its own with $HOST_ENV (default: the 4 chips of a v4 host; other
#   generations need their own chip bounds).
# The workdir and data_dir must be on storage all hosts share (gs://). Preempted? `run` or
# `sweep` again with the same arguments: finished runs are skipped, an interrupted one resumes
# from its latest checkpoint (a run that receives SIGTERM checkpoints its current step first).
# DRY_RUN=1 prints the gcloud commands instead.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
REPO="${REPO:-https://github.com/reinit-project/reinit.git}"
DIR="${DIR:-reinit}"
VENV="${VENV:-~/reinit-venv}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
HOST_ENV="${HOST_ENV:-TPU_PROCESS_BOUNDS=1,1,1 TPU_CHIPS_PER_PROCESS_BOUNDS=2,2,1 \
TPU_VISIBLE_CHIPS=0,1,2,3}"

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

on_all_hosts() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

case "${1:-}" in
  create)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ;;
  setup)
    on_all_hosts "set -e; python3 -m pip install -q --user uv; \
[ -x $VENV/bin/python ] || python3 -m uv venv --python $PYTHON_VERSION $VENV; \
[ -d $DIR ] || git clone $REPO $DIR; cd $DIR && git pull --ff-only; \
python3 -m uv pip install -q --python $VENV/bin/python -e '.[train]' 'jax[tpu]'; \
$VENV/bin/python -c 'import sys, jax; assert sys.version_info >= (3, 11); print(jax.devices())'" ;;
  run)
    shift
    on_all_hosts "cd $DIR && $VENV/bin/python -m launch.main --distributed $(printf '%q ' "$@")" ;;
  sweep)
    shift
    : "${HOSTS:?set HOSTS to the number of TPU VM hosts of the slice (v4-32: 4)}"
    for ((worker = 0; worker < HOSTS; worker++)); do
      command=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="$worker"
        --command="cd $DIR && env $HOST_ENV $VENV/bin/python -m launch.sweep \
--task_index=$worker --num_tasks=$HOSTS $(printf '%q ' "$@")")
      if [[ "${DRY_RUN:-0}" == 1 ]]; then run "${command[@]}"; else "${command[@]}" & fi
    done
    wait ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet ;;
  *)
    echo "usage: $0 create|setup|run ARGS...|sweep ARGS...|delete (see the header of this file)" >&2
    exit 2 ;;
esac
