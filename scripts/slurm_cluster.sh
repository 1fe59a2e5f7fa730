#!/usr/bin/env bash
# Start / stop a throw-away SLURM cluster on this machine, to test the launch scripts for real.
#
#   scripts/slurm_cluster.sh start [--dir DIR] [--nodes N] [--gpus-per-node G]
#   scripts/slurm_cluster.sh stop  [--dir DIR]
#   scripts/slurm_cluster.sh status [--dir DIR]
#
# Everything lives in DIR (default /tmp/pod-slurm): slurm.conf, spool, state, logs and the PID files
# of the daemons this script started (munge's socket sits in a /tmp/pod-munge.* folder named
# there). `start` writes DIR/env.sh; `source` it (or set SLURM_CONF=DIR/slurm.conf) before
# sbatch/srun/squeue. `stop` kills exactly the daemons recorded in DIR (by PID), never anything
# found by name, so it cannot hit another cluster on the same machine.
#
# --nodes 2 starts two slurmd on this host (ports differ) and names the nodes podnode1, podnode2; the
# names are added to /etc/hosts (root only) because torchrun resolves the first node's name.
# --gpus-per-node declares G fake GPUs per node (character devices aliasing /dev/null), so that a
# job script asking for GPUs is scheduled unchanged; nothing runs on them (POD_LAUNCH_DEVICE=cpu).
#
# Needs Debian's slurmctld slurmd slurm-client munge (scripts/ci_slurm.sh installs them) and root
# (slurmd runs jobs as their owner; SlurmUser=root keeps the setup to one user).
set -euo pipefail

die() { echo "slurm_cluster.sh: error: $*" >&2; exit 1; }

cmd=${1:-}
[ -n "$cmd" ] || die "usage: $0 start|stop|status [--dir DIR] [--nodes N] [--gpus-per-node G]"
shift
DIR=${POD_SLURM_DIR:-/tmp/pod-slurm}
NODES=1
GPUS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --gpus-per-node) GPUS=$2; shift 2 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ "$GPUS" =~ ^[0-9]+$ ]] || die "--gpus-per-node must be a non-negative integer, got '$GPUS'"

node_names() {
  if [ "$NODES" -eq 1 ]; then echo localhost; else for i in $(seq 1 "$NODES"); do echo "podnode$i"; done; fi
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_cluster() {
  local pidfile pid
  [ -d "$DIR" ] || { echo "no cluster in $DIR"; return 0; }
  # slurmd first (so it does not retry the controller), then slurmctld, then munged.
  for pidfile in "$DIR"/run/slurmd-*.pid "$DIR"/run/slurmctld.pid "$DIR"/run/munged.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pidfile"
  done
  if [ -f "$DIR/run/munge_dir" ]; then
    rm -rf "$(cat "$DIR/run/munge_dir")"
    rm -f "$DIR/run/munge_dir"
  fi
  echo "stopped the cluster in $DIR"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A daemon that forks writes its PID file a moment after the parent returns.
wait_pidfile() {
  local pidfile=$1 what=$2 log=$3
  for _ in $(seq 100); do alive "$pidfile" && return 0; sleep 0.1; done
  echo "---- $log" >&2; tail -n 20 "$log" >&2 || true
  stop_cluster >&2   # whatever started before this daemon
  die "$what did not start (see $log)"
}

start_cluster() {
  for bin in munged slurmctld slurmd sinfo; do
    command -v "$bin" >/dev/null || die "$bin not found: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
  done
  [ "$(id -u)" -eq 0 ] || die "run as root (slurmd must be able to start jobs as any user)"
  if alive "$DIR/run/slurmctld.pid"; then
    die "a cluster is already running in $DIR (slurmctld pid $(cat "$DIR/run/slurmctld.pid")); stop it first: $0 stop --dir $DIR"
  fi
  rm -rf "$DIR"
  mkdir -p "$DIR"/{run,state,log,spool}
  DIR=$(cd "$DIR" && pwd)

  # munged runs as its own user and refuses a socket folder others can write to; DIR may sit under a
  # folder the munge user cannot enter (mktemp -d and pytest make them 0700), so munge gets a
  # folder of its own in /tmp, recorded in DIR and removed by `stop`.
  [ -f /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (the munge package creates it; try: mungekey --create)"
  MUNGE=$(mktemp -d /tmp/pod-munge.XXXXXX)
  echo "$MUNGE" > "$DIR/run/munge_dir"
  chmod 0755 "$MUNGE"
  chown munge:munge "$MUNGE"
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE/munge.socket" --pid-file="$MUNGE/munged.pid" \
    --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed"
  wait_pidfile "$MUNGE/munged.pid" munged "$MUNGE/munged.log"
  cp "$MUNGE/munged.pid" "$DIR/run/munged.pid"

  local names ctld_port host cpus i node port line
  mapfile -t names < <(node_names)
  if [ "$NODES" -gt 1 ]; then
    # torchrun on the job's first node resolves that node's name (MASTER_ADDR).
    for node in "${names[@]}"; do
      getent hosts "$node" >/dev/null || echo "127.0.0.1 $node  # added by PoD scripts/slurm_cluster.sh" >> /etc/hosts
    done
  fi
  ctld_port=$(free_port)
  host=$(hostname)
  cpus=$(nproc)
  {
    echo "# Written by scripts/slurm_cluster.sh for a test cluster on $host"
    echo "ClusterName=pod-test"
    echo "SlurmctldHost=localhost"
    echo "SlurmctldPort=$ctld_port"
    echo "AuthType=auth/munge"
    # cred_expire: a requeued job waits that long + 1 s before it may start again (default 120 s);
    # 10 s keeps the requeue test short.
    echo "AuthInfo=socket=$MUNGE/munge.socket,cred_expire=10"
    echo "CredType=cred/munge"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    # No systemd / cgroups here: track processes through /proc, no task binding.
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "MpiDefault=none"
    # Schedule on submit (builtin). MinJobAge=5: `sbatch --wait` polls every 2 s (it backs off to
    # 32 s unless the interval is below MinJobAge/2), at the price of finished jobs leaving
    # scontrol after ~5 s.
    echo "SchedulerType=sched/builtin"
    # A requeued job becomes eligible with no event to trigger scheduling; the periodic pass
    # (default every 60 s) would start it late.
    echo "SchedulerParameters=sched_interval=2"
    # Job ids start at a random value: logs and run folders named after job ids (slurm-<id>) from
    # an earlier throw-away cluster are not picked up again.
    echo "FirstJobId=$(( (RANDOM * 32768 + RANDOM) % 900000 + 1000 ))"
    echo "MinJobAge=5"
    echo "KillWait=10"
    echo "ReturnToService=2"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "JobCompType=jobcomp/none"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    if [ "$GPUS" -gt 0 ]; then echo "GresTypes=gpu"; fi
    for node in "${names[@]}"; do
      port=$(free_port)
      line="NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=$cpus State=UNKNOWN"
      if [ "$GPUS" -gt 0 ]; then line="$line Gres=gpu:$GPUS"; fi
      echo "$line"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > "$DIR/slurm.conf"
  if [ "$GPUS" -gt 0 ]; then
    # slurmd drops GPUs without a device file, so each fake GPU is a character device that is
    # /dev/null (1,3); nothing ever opens it. mknod can be refused in some containers: fall back
    # to a plain file, which slurmd accepts with an error line in its log.
    mkdir -p "$DIR/gpu"
    local files=()
    for i in $(seq 0 $((GPUS - 1))); do
      mknod "$DIR/gpu/gpu$i" c 1 3 2>/dev/null || touch "$DIR/gpu/gpu$i"
      files+=("$DIR/gpu/gpu$i")
    done
    for node in "${names[@]}"; do
      echo "NodeName=$node Name=gpu File=$(IFS=,; echo "${files[*]}")"
    done > "$DIR/gres.conf"
  fi
  export SLURM_CONF="$DIR/slurm.conf"
  echo "export SLURM_CONF=$DIR/slurm.conf" > "$DIR/env.sh"

  /usr/sbin/slurmctld -f "$SLURM_CONF"
  wait_pidfile "$DIR/run/slurmctld.pid" slurmctld "$DIR/log/slurmctld.log"
  for node in "${names[@]}"; do
    mkdir -p "$DIR/spool/$node"
    /usr/sbin/slurmd -f "$SLURM_CONF" -N "$node"
    wait_pidfile "$DIR/run/slurmd-$node.pid" "slurmd ($node)" "$DIR/log/slurmd-$node.log"
  done

  local states=""
  for _ in $(seq 300); do
    states=$(sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' ')
    if [ "$states" = "idle " ] && [ "$(sinfo -h -N -o %N | wc -l)" -eq "$NODES" ]; then
      echo "SLURM cluster up in $DIR: $NODES node(s) [${names[*]}], $cpus CPUs each, $GPUS fake GPUs each"
      echo "use it with: source $DIR/env.sh"
      return 0
    fi
    case "$states" in *inval*|*drain*|*down\**) break ;; esac
    sleep 0.1
  done
  local reasons
  reasons=$(sinfo -h -R -o '%E' 2>/dev/null | tr '\n' ' ')
  tail -n 20 "$DIR"/log/*.log >&2 || true
  stop_cluster
  die "the nodes did not become idle (states: '$states'; reasons: '$reasons'); logs are in $DIR/log"
}

status_cluster() {
  [ -f "$DIR/slurm.conf" ] || die "no cluster in $DIR"
  local pidfile
  for pidfile in "$DIR"/run/*.pid; do
    [ -f "$pidfile" ] || continue
    if alive "$pidfile"; then echo "$(basename "$pidfile" .pid): running (pid $(cat "$pidfile"))"
    else echo "$(basename "$pidfile" .pid): not running"; fi
  done
  SLURM_CONF="$DIR/slurm.conf" sinfo -N || true
}

case "$cmd" in
  start) start_cluster ;;
  stop) stop_cluster ;;
  status) status_cluster ;;
  *) die "unknown command '$cmd': use start, stop or status" ;;
esac
