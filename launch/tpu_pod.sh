#!/usr/bin/env bash
# Runs reinit on a Cloud TPU VM pod slice: one process per TPU VM host, all hosts at once.
#
#   export TPU_NAME=reinit-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 \
#          RUNTIME=tpu-ubuntu2204-base REPO=https://github.com/you/reinit.git
#   launch/tpu_pod.sh create              # create the pod slice
#   launch/tpu_pod.sh setup               # clone the repo and install it (with jax[tpu]) on every host
#   launch/tpu_pod.sh run --config=configs/benchmark.py:dataset=cifar10,model=resnet18,method=lw \
#       --workdir=gs://BUCKET/runs/cifar10_lw --config.data_dir=gs://BUCKET/tensorflow_datasets
#   launch/tpu_pod.sh delete              # delete the pod slice
#
# `run` passes its arguments to `python -m launch.main --distributed` on every host
# (--worker=all): `jax.distributed.initialize()` finds the pod's hosts by itself, each host
# feeds its slice of every batch, only host 0 writes results and logs. The workdir and data_dir
# must be on storage all hosts share (gs://). Preempted? `run` again with the same arguments:
# the run resumes from its latest checkpoint. DRY_RUN=1 prints the gcloud commands instead.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
REPO="${REPO:-https://github.com/reinit-project/reinit.git}"
DIR="${DIR:-reinit}"

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
    on_all_hosts "set -e; [ -d $DIR ] || git clone $REPO $DIR; cd $DIR && git pull --ff-only \
      && python3 -m pip install -q -e . 'jax[tpu]'" ;;
  run)
    shift
    on_all_hosts "cd $DIR && python3 -m launch.main --distributed $(printf '%q ' "$@")" ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet ;;
  *)
    echo "usage: $0 create|setup|run ARGS...|delete (see the header of this file)" >&2
    exit 2 ;;
esac
