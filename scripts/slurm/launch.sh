# shellcheck shell=bash
# Sourced by single_node.sbatch and multi_node.sbatch (not run on its own): starts
# `train/run.py` on every allocated node through one `srun` step with one torchrun agent per node.
#
# Inputs (set in the sbatch file or the environment of `sbatch`):
#   CONF, OVERRIDES, RUN_NAME, RUN_DIR   what to run and where (see the sbatch files)
#   POD_ROOT        repository checkout (default: the folder `sbatch` was called from)
#   PYTHON          interpreter with PoD installed (default: $POD_ROOT/.venv/bin/python)
#   POD_LAUNCH_DEVICE  gpu (default) or cpu: CPU processes with gloo, for testing the launch on
#                   machines without GPUs; workers per node then come from --ntasks-per-node
#   NPROC_PER_NODE  workers per node (default: GPUs allocated per node, or tasks per node on cpu)
#   MAX_RESTARTS    torchrun restarts of all workers after one fails (default 0: fail the job)
#   POD_SAVE_GRACE  seconds the workers get to save a checkpoint after USR1 before the job is
#                   requeued anyway (default 240; keep it below the 300 s lead of --signal=B:USR1@300)
#   POD_REQUEUE_ON_TERM=1  requeue on SIGTERM too (clusters whose preemption cancels instead of
#                   requeueing); off by default because `scancel` also sends SIGTERM
# Anything else in the environment (WANDB_*, HF_TOKEN, HF_HOME, ...) reaches every rank: srun
# passes the whole environment to its tasks and torchrun to its workers.

set -euo pipefail

log() { echo "[pod-slurm $(date '+%H:%M:%S')] $*"; }
die() { echo "[pod-slurm] error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job: submit with sbatch scripts/slurm/<file>.sbatch"

POD_ROOT=${POD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$POD_ROOT/train/run.py" ] || die "POD_ROOT=$POD_ROOT has no train/run.py: call sbatch from the repository root, or export POD_ROOT=<checkout>"
cd "$POD_ROOT"
PYTHON=${PYTHON:-$POD_ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not an interpreter: run scripts/setup.sh, or export PYTHON=<python with pod installed>"

# ---------------------------------------------------------------------------------- topology
NNODES=${SLURM_NNODES:-1}
mapfile -t job_nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${job_nodes[0]}
# A port from the job id: stable across requeues of this job, different for jobs sharing a node.
MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))
export MASTER_ADDR MASTER_PORT

POD_LAUNCH_DEVICE=${POD_LAUNCH_DEVICE:-gpu}
case "$POD_LAUNCH_DEVICE" in
  gpu)
    NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    [ -n "$NPROC_PER_NODE" ] || die "no GPUs in this allocation (SLURM_GPUS_ON_NODE is unset): request them with #SBATCH --gpus-per-node=N, or set NPROC_PER_NODE"
    device_override=()
    ;;
  cpu)
    NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}
    # The cpu accelerator makes DeepSpeed use gloo; fake GPUs of a test cluster stay unused.
    export DS_ACCELERATOR=cpu
    device_override=(device=cpu)
    ;;
  *) die "POD_LAUNCH_DEVICE=$POD_LAUNCH_DEVICE: use gpu or cpu" ;;
esac
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=$NPROC_PER_NODE is not a positive integer"

# ---------------------------------------------------------------------------- the run folder
# The same job id after a requeue (or the same RUN_NAME on a new submission) gives the same run
# folder, and train/run.py continues a run folder where it stopped (last adapt checkpoint).
RUN_NAME=${RUN_NAME:-slurm-$SLURM_JOB_ID}
overrides=("conf=${CONF:?set CONF to a preset of conf/conf/}" "run_name=$RUN_NAME")
[ -z "${RUN_DIR:-}" ] || overrides+=("run_dir=$RUN_DIR")
# The pipeline sets W&B from its config (logging.*); map the usual W&B variables onto it.
[ -z "${WANDB_MODE:-}" ] || overrides+=("logging.wandb_mode=$WANDB_MODE")
[ -z "${WANDB_PROJECT:-}" ] || overrides+=("logging.wandb_project=$WANDB_PROJECT")
[ -z "${WANDB_ENTITY:-}" ] || overrides+=("logging.wandb_entity=$WANDB_ENTITY")
overrides+=("${device_override[@]}")
read -r -a extra <<< "${OVERRIDES:-}"
overrides+=("${extra[@]}" "$@")

log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${job_nodes[*]}: $NNODES node(s) x $NPROC_PER_NODE $POD_LAUNCH_DEVICE worker(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
log "commit $(git -C "$POD_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown); python train/run.py ${overrides[*]}"

# ------------------------------------------------------------------------- signals, requeue
# `#SBATCH --signal=B:USR1@300` sends USR1 to this shell 5 minutes before the time limit. The shell
# then touches the stop file that train/run.py watches (train.stop_file): at the end of the
# current optimizer step every worker saves a checkpoint and the step exits (status 3). The shell
# then requeues the job, which keeps its id, so the next start finds the same run folder and
# resumes from that checkpoint: nothing is redone. If the workers have not stopped within
# POD_SAVE_GRACE seconds (a stage before adapt, a slow file system), the job is requeued anyway
# and resumes from the last complete checkpoint. Slurm's own preemption with PreemptMode=REQUEUE
# requeues the job itself (it has --requeue) without that save. Bash runs a trap only between
# commands, so the step runs in the background and this shell polls it.
STOP_FILE=$POD_ROOT/.pod-slurm/stop-$SLURM_JOB_ID
mkdir -p "${STOP_FILE%/*}"
rm -f "$STOP_FILE"  # left by a run of this job that was killed before its workers saw it
overrides+=("train.stop_file=$STOP_FILE")
POD_SAVE_GRACE=${POD_SAVE_GRACE:-240}
[[ "$POD_SAVE_GRACE" =~ ^[0-9]+$ ]] || die "POD_SAVE_GRACE=$POD_SAVE_GRACE is not a number of seconds"
step_pid=""
requeued=0
save_deadline=""
# shellcheck disable=SC2317  # called by the traps and the wait loop below
requeue() {
  log "requeueing job $SLURM_JOB_ID ($1); it resumes from the last checkpoint when it starts again"
  if scontrol requeue "$SLURM_JOB_ID"; then requeued=1; else log "scontrol requeue failed (job not requeueable?)"; fi
}
# shellcheck disable=SC2317
on_usr1() {
  if [ -z "$step_pid" ] || [ -n "$save_deadline" ] || [ "$requeued" = 1 ]; then return; fi
  touch "$STOP_FILE"
  save_deadline=$((SECONDS + POD_SAVE_GRACE))
  log "received USR1: asked the workers to save a checkpoint and stop ($STOP_FILE); requeueing when they exit, at most ${POD_SAVE_GRACE}s from now"
}
# shellcheck disable=SC2317
on_term() {
  if [ "$requeued" = 1 ]; then
    log "received TERM: SLURM is stopping this run of the job to requeue it"
  elif [ "${POD_REQUEUE_ON_TERM:-0}" = 1 ]; then
    requeue "received TERM"
  else
    log "received TERM: stopping (no requeue; resubmit with RUN_NAME=$RUN_NAME to resume)"
    [ -z "$step_pid" ] || kill -TERM "$step_pid" 2>/dev/null || true
  fi
}
trap on_usr1 USR1
trap on_term TERM

# One torchrun agent per node (-N nodes -n nodes): with more tasks per node than one, each task
# would start its own agent and the rendezvous would break. The agent gets every CPU of its node
# (cgroups would otherwise confine all workers to one core). --kill-on-bad-exit ends the other
# nodes at once when one agent fails, so a broken config fails the job instead of hanging it.
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
  --kill-on-bad-exit=1 --export=ALL \
  "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --max_restarts="${MAX_RESTARTS:-0}" \
  train/run.py "${overrides[@]}" &
step_pid=$!

# Poll rather than `wait` on the step: the save deadline must be checked while it runs.
while kill -0 "$step_pid" 2>/dev/null; do
  if [ -n "$save_deadline" ] && [ "$requeued" = 0 ] && [ "$SECONDS" -ge "$save_deadline" ]; then
    requeue "the workers did not stop within ${POD_SAVE_GRACE}s of USR1"
  fi
  sleep 1 || true
done
wait "$step_pid" && status=0 || status=$?
if [ -n "$save_deadline" ] && [ "$requeued" = 0 ]; then
  # Rank 0 deletes the stop file once the checkpoint is saved (torchrun's exit status says nothing).
  if [ -e "$STOP_FILE" ]; then
    rm -f "$STOP_FILE"
    requeue "the step ended with status $status after USR1 without saving on the stop file"
  else
    requeue "the workers saved a checkpoint and stopped after USR1"
  fi
  exit "$status"
fi
if [ "$status" -eq 0 ]; then
  log "done: run folder ${RUN_DIR:-outputs/$RUN_NAME} (relative paths are inside $POD_ROOT)"
else
  # torchrun exits 1 whatever its worker's status was; the worker's own message is in this log.
  log "the training step failed with exit status $status; the error is above (train/run.py prints 'error: ...' for bad config or input, 'interrupted: ...' when train.stop_after_steps stopped it)"
fi
exit "$status"
