#!/usr/bin/env bash
# A single-node Slurm cluster on this machine: to try the Slurm sweep on a laptop, and for CI.
#
#   launch/slurm/local_cluster.sh up       # install (if missing), configure and start it
#   launch/slurm/local_cluster.sh status   # exit 0 when it answers, 1 otherwise
#   launch/slurm/local_cluster.sh down     # stop the daemons `up` started (by their PIDs)
#
#   python -m launch.sweep --config=configs/digits.py --workdir=runs/digits --scheduler=slurm --wait
#
# Needs root (or sudo) on Debian/Ubuntu: `up` installs the packages munge, slurmctld, slurmd and
# slurm-client when they are missing, writes /etc/slurm/slurm.conf (only when there is none or
# it is one this script wrote), and starts munged, slurmctld and slurmd by hand: package scripts
# cannot start services where there is no init system (containers, CI machines). The daemons'
# state, logs and PID files go to $STATE (default /var/tmp/reinit-slurm); `down` stops the
# daemons whose PIDs `up` recorded there, and only those, and leaves packages and files alone.
#
# The cluster: one node named `hostname -s` on 127.0.0.1, partition `local`, cores as the
# consumable (select/cons_tres, CR_Core: each task takes its cores, so an array runs as many
# tasks at once as there are cores; memory is not a consumable, else each task would take all of
# it and tasks would run one at a time). No cgroups (proctrack/linuxproc, task/none), no
# accounting daemon (no `sacct`: finished jobs stay visible to `squeue -t all` and `scontrol
# show job` for MinJobAge), EnforcePartLimits=ALL (an impossible request is refused at
# submission instead of pending forever). GPUS=N adds N fake GPUs (gres `gpu`, character
# devices like /dev/null) to try `--slurm.gpus_per_task`; without it the node has no GPUs and
# Slurm rejects any GPU request.
set -euo pipefail

STATE="${STATE:-/var/tmp/reinit-slurm}"
CONF_DIR=/etc/slurm
MARK="# Written by reinit's launch/slurm/local_cluster.sh; rewritten by its 'up'."
GPUS="${GPUS:-0}"
PACKAGES=(munge slurmctld slurmd slurm-client)

as_root() {
  if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

install() {
  local missing=0
  for command in munged slurmctld slurmd sbatch; do
    command -v "$command" >/dev/null || missing=1
  done
  [[ $missing == 0 ]] && return
  echo "installing ${PACKAGES[*]} ..."
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${PACKAGES[@]}" >/dev/null
}

configure() {
  local conf="$CONF_DIR/slurm.conf" node
  node="$(hostname -s)"
  if [[ -e "$conf" ]] && ! grep -qF "$MARK" "$conf"; then
    echo "error: $conf exists and was not written by this script; not touching it" >&2
    exit 1
  fi
  as_root mkdir -p "$STATE/ctld" "$STATE/d" "$CONF_DIR"
  # The node's real CPUs/cores/memory, as slurmd detects them (it refuses a node that
  # claims more than it has).
  local hardware gres="" gpu_lines=""
  hardware="$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')"
  if [[ "$GPUS" -gt 0 ]]; then
    for ((i = 0; i < GPUS; i++)); do
      [[ -c "$STATE/gpu$i" ]] || as_root mknod "$STATE/gpu$i" c 1 3  # like /dev/null
    done
    gres="Gres=gpu:$GPUS"
    gpu_lines="GresTypes=gpu"
    printf '%s\nName=gpu File=%s\n' "$MARK" "$STATE/gpu[0-$((GPUS - 1))]" \
      | as_root tee "$CONF_DIR/gres.conf" >/dev/null
  elif [[ -e "$CONF_DIR/gres.conf" ]] && grep -qF "$MARK" "$CONF_DIR/gres.conf"; then
    as_root rm "$CONF_DIR/gres.conf"
  fi
  as_root tee "$conf" >/dev/null <<EOF
$MARK
ClusterName=reinit-local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
EnforcePartLimits=ALL
MinJobAge=86400
ReturnToService=2
MpiDefault=none
$gpu_lines
NodeName=$node NodeAddr=127.0.0.1 $hardware $gres State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() {  # alive NAME: the daemon whose PID `up` recorded runs
  local pid_file="$STATE/$1.pid" pid
  [[ -s "$pid_file" ]] || return 1
  pid="$(cat "$pid_file")"
  [[ -d "/proc/$pid" ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1" ]]
}

start_munged() {
  if munge -n </dev/null >/dev/null 2>&1; then return; fi  # a munged already answers: not ours
  as_root mkdir -p /run/munge /var/log/munge /var/lib/munge
  as_root chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if ! as_root test -s /etc/munge/munge.key; then  # the package makes one; in case it did not
    as_root runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
  fi
  as_root runuser -u munge -- munged --pid-file=/run/munge/munged.pid
  as_root cp /run/munge/munged.pid "$STATE/munged.pid"
}

wait_until_idle() {
  local node
  node="$(hostname -s)"
  for _ in $(seq 60); do
    if scontrol ping >/dev/null 2>&1 \
        && sinfo -h -n "$node" -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      return
    fi
    sleep 0.5
  done
  echo "error: the local Slurm did not come up; logs in $STATE" >&2
  tail -5 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
  exit 1
}

up() {
  install
  as_root mkdir -p "$STATE"
  start_munged
  if ! alive slurmctld || ! alive slurmd; then configure; fi
  alive slurmctld || as_root slurmctld
  alive slurmd || as_root slurmd
  wait_until_idle
  echo "local Slurm is up: node $(hostname -s), partition local; stop it with $0 down"
}

down() {
  # slurmd first: jobs still running are killed with it; slurmctld keeps their records.
  for name in slurmd slurmctld munged; do
    if alive "$name"; then
      local pid
      pid="$(cat "$STATE/$name.pid")"
      as_root kill "$pid"
      for _ in $(seq 50); do [[ -d "/proc/$pid" ]] || break; sleep 0.2; done
    fi
    as_root rm -f "$STATE/$name.pid"
  done
  echo "local Slurm is down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) scontrol ping >/dev/null 2>&1 && sinfo ;;
  *) echo "usage: $0 up|status|down (see the header of this file)" >&2; exit 2 ;;
esac
