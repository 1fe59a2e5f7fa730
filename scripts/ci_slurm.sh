#!/usr/bin/env bash
# A real SLURM in CI: run the project's own sbatch scripts, unchanged, on a throw-away cluster on
# this machine (CPU workers; the cluster declares fake GPUs so the scripts' GPU requests schedule).
#
#   scripts/ci_slurm.sh [CHECK ...]      CHECK: single (default), multi, cancel, kill, requeue,
#                                        badconfig, or all
#
#   single     single_node.sbatch, 1 node x 2 workers (DeepSpeed ZeRO-2, gloo), whole pipeline;
#              the export must load with AutoModelForCausalLM(..., trust_remote_code=True)
#   multi      multi_node.sbatch across two slurmd on this host ("nodes" podnode1, podnode2)
#   cancel     scancel mid-training, resubmit with the same RUN_NAME: resumes from the last
#              checkpoint and ends with the same weights as an uninterrupted run
#   kill       SIGKILL one rank mid-training: the job fails at once; the resubmission resumes and
#              ends with the same weights
#   requeue    USR1 to the batch shell (what --signal=B:USR1@300 sends before the time limit): the
#              workers save a checkpoint at once, the job requeues itself, restarts under the same
#              id and resumes from that checkpoint
#   badconfig  a misspelt override fails the job within seconds with its error in the job log
#
# Installs slurmctld slurmd slurm-client munge from Debian when missing (root + apt), starts the
# cluster with scripts/slurm_cluster.sh and stops the daemons it started (by PID) on exit.
# Environment: POD_CI_SLURM_DIR (work folder, default a new /tmp/pod-ci-slurm.XXXX, removed at the
# end unless POD_CI_KEEP=1), POD_CI_CACHE (the pipeline's cache_dir, default <repo>/cache: the tiny
# base model is built once and reused), PYTHON (default <repo>/.venv/bin/python).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
export PYTHON

checks=("$@")
[ ${#checks[@]} -gt 0 ] || checks=(single)
if [ "${checks[*]}" = all ]; then checks=(badconfig single multi cancel kill requeue); fi
for check in "${checks[@]}"; do
  case "$check" in single|multi|cancel|kill|requeue|badconfig) ;; *)
    echo "ci_slurm.sh: unknown check '$check' (single, multi, cancel, kill, requeue, badconfig, all)" >&2; exit 2 ;;
  esac
done

# Progress goes to stderr: functions below return values on stdout.
log() { echo "[ci_slurm $(date '+%H:%M:%S')] $*" >&2; }
fail() { echo "[ci_slurm] FAIL: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------------ install
if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
  || ! command -v munged >/dev/null; then
  [ "$(id -u)" -eq 0 ] || fail "SLURM is not installed and this is not root: apt-get install slurmctld slurmd slurm-client munge"
  command -v apt-get >/dev/null || fail "SLURM is not installed and there is no apt-get (Debian/Ubuntu only)"
  log "installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
[ -x "$PYTHON" ] || fail "PYTHON=$PYTHON not found: run scripts/setup.sh first"

# ------------------------------------------------------------------------------------ cluster
WORK=${POD_CI_SLURM_DIR:-$(mktemp -d /tmp/pod-ci-slurm.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
CLUSTER=$WORK/cluster
cleanup() {
  local status=$?
  bash "$REPO/scripts/slurm_cluster.sh" stop --dir "$CLUSTER" >/dev/null 2>&1 || true
  if [ "$status" -ne 0 ]; then
    log "failed; job logs:"; tail -n 40 "$WORK"/logs/*.log 2>/dev/null || true
  fi
  # A folder the caller named is theirs; our own temporary one goes unless asked to keep it or failed.
  if [ -n "${POD_CI_SLURM_DIR:-}" ] || [ "${POD_CI_KEEP:-0}" = 1 ] || [ "$status" -ne 0 ]; then
    log "kept $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
# Two "nodes" with 2 fake GPUs each: single-node jobs use one of them, multi-node jobs both.
bash "$REPO/scripts/slurm_cluster.sh" start --dir "$CLUSTER" --nodes 2 --gpus-per-node 2
# shellcheck disable=SC1091
source "$CLUSTER/env.sh"
mkdir -p "$WORK/logs" "$WORK/runs"
cd "$WORK/logs"   # sbatch writes the job logs (%x-%j.log) where it is called

# ---------------------------------------------------------------------------- the tiny job
# The tiny preset shrunk for CI: a ~0.3M-parameter base model pretrained for a few steps, 256-token
# rows, 12 adapt steps with a checkpoint every 3, ZeRO-2 over gloo. Workers: 2 per node (-n 2).
CACHE=${POD_CI_CACHE:-$REPO/cache}
TINY="cache_dir=$CACHE base.steps=30 base.stdlib_chars=300000 base.passkey_docs=100 base.hidden_size=64 \
base.intermediate_size=128 base.vocab_size=1024 data.seq_len=256 analyze.n_sequences=4 \
evaluate.passkey_context_len=200 evaluate.passkey_samples=2 data.eval_rows=4 \
train.micro_batch_size=2 train.global_batch_size=4 train.max_steps=12 train.save_steps=3 \
deepspeed=zero2 logging=none"
UP_TO_ADAPT="stages=[base,analyze,convert,adapt]"
export POD_LAUNCH_DEVICE=cpu POD_ROOT=$REPO CONF=tiny HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Job options given to sbatch on the command line override the script's #SBATCH lines (its GPU and
# CPU counts are sized for a GPU node); the script file itself is not changed.
SINGLE=(--gpus-per-node=2 --ntasks-per-node=2 --cpus-per-task=1 --time=20)
MULTI=(--nodes=2 --gpus-per-node=1 --ntasks-per-node=1 --cpus-per-task=1 --time=20)

# submit SCRIPT ARGS... -> job id
submit() { sbatch --parsable "$@" | cut -d';' -f1; }

job_state() { scontrol show job "$1" -o 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }

# Wait for a job to finish (scontrol keeps it ~5 s after the end, MinJobAge); print its exit code.
wait_job() {
  local id=$1 limit=${2:-600} state="" t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$limit" ]; do
    state=$(job_state "$id")
    case "$state" in
      COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED)
        scontrol show job "$id" -o | sed -n 's/.* ExitCode=\([0-9:]*\).*/\1/p'; return 0 ;;
      "") echo "gone"; return 0 ;;
    esac
    sleep 0.5
  done
  scancel "$id" || true
  fail "job $id still $state after ${limit}s"
}

# Wait until a path exists (or the job ends).
wait_for_path() {
  local path=$1 id=$2 limit=${3:-600} t0=$SECONDS
  while [ ! -e "$path" ]; do
    [ $((SECONDS - t0)) -lt "$limit" ] || fail "$path did not appear within ${limit}s"
    case "$(job_state "$id")" in RUNNING|PENDING|CONFIGURING|"") ;; *)
      fail "job $id ended ($(job_state "$id")) before $path appeared" ;;
    esac
    sleep 0.2
  done
}

# The highest checkpoint step under a run folder (0 if none).
last_checkpoint() {
  local dir=$1/adapt/checkpoints
  find "$dir" -maxdepth 1 -name 'checkpoint-*' 2>/dev/null | sed 's/.*checkpoint-//' | sort -n | tail -1 | grep . || echo 0
}

# Every tensor of two saved models equal (safetensors files in the two folders).
same_weights() {
  "$PYTHON" - "$1" "$2" <<'EOF'
import sys
from pathlib import Path

from safetensors.torch import load_file

def load(folder):
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    if not tensors:
        sys.exit(f"no safetensors in {folder}")
    return tensors

a, b = load(sys.argv[1]), load(sys.argv[2])
if a.keys() != b.keys():
    sys.exit(f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print(f"max |difference| over {len(a)} tensors: {worst:.3g}")
sys.exit(0 if worst <= 1e-5 else 1)
EOF
}

# The uninterrupted reference for the fault checks (run once, reused).
reference_run() {
  local dir=$WORK/runs/reference
  if [ ! -f "$dir/adapt/DONE" ]; then
    log "reference: uninterrupted run (stages up to adapt)"
    local id code
    id=$(RUN_NAME=reference RUN_DIR=$dir OVERRIDES="$TINY $UP_TO_ADAPT" submit "${SINGLE[@]}" "$REPO/scripts/slurm/single_node.sbatch")
    code=$(wait_job "$id")
    [ "$code" = "0:0" ] || fail "reference job $id ended with exit code $code"
  fi
  echo "$dir"
}

check_single() {
  log "single: single_node.sbatch, 1 node x 2 CPU workers, whole pipeline"
  local dir=$WORK/runs/single id t0=$SECONDS
  # sbatch --wait returns the job's exit code (it polls every 2 s on this cluster: MinJobAge=5).
  RUN_NAME=single RUN_DIR=$dir OVERRIDES="$TINY" sbatch --parsable --wait "${SINGLE[@]}" \
    "$REPO/scripts/slurm/single_node.sbatch" > "$WORK/single.id" || fail "single-node job $(cat "$WORK/single.id") failed"
  id=$(cut -d';' -f1 "$WORK/single.id")
  [ -f "$dir/export/DONE" ] || fail "no finished export in $dir"
  grep -q "1 node(s) x 2 cpu worker(s)" "pod-$id.log" || fail "the log of job $id does not show 2 workers"
  (cd "$WORK" && "$PYTHON" - "$dir/export/model" <<'EOF'
import sys

import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = torch.randint(3, model.config.vocab_size, (1, 40))
out = model.generate(ids, max_new_tokens=4, do_sample=False)
print(f"export loads with trust_remote_code: {type(model).__name__}, generated {out.shape[1] - 40} tokens")
EOF
  ) || fail "the export in $dir/export/model does not load with trust_remote_code"
  log "single: ok ($((SECONDS - t0)) s)"
}

check_multi() {
  log "multi: multi_node.sbatch, 2 nodes x 1 CPU worker"
  local dir=$WORK/runs/multi id code t0=$SECONDS
  id=$(RUN_NAME=multi RUN_DIR=$dir OVERRIDES="$TINY $UP_TO_ADAPT" submit "${MULTI[@]}" "$REPO/scripts/slurm/multi_node.sbatch")
  code=$(wait_job "$id")
  [ "$code" = "0:0" ] || fail "multi-node job $id ended with exit code $code"
  grep -q "on podnode1 podnode2: 2 node(s) x 1 cpu worker(s)" "pod-$id.log" || fail "job $id did not run on both nodes"
  [ -f "$dir/adapt/DONE" ] || fail "no finished adapt stage in $dir"
  log "multi: ok ($((SECONDS - t0)) s)"
}

# Interrupt a job with $1 (cancel | kill) after its first checkpoint, resubmit, compare weights.
check_interrupt() {
  local how=$1 ref dir id code step id2 pid t0=$SECONDS
  ref=$(reference_run)
  dir=$WORK/runs/$how
  log "$how: submit, interrupt after the first checkpoint, resubmit"
  id=$(RUN_NAME=$how RUN_DIR=$dir OVERRIDES="$TINY $UP_TO_ADAPT" submit "${SINGLE[@]}" "$REPO/scripts/slurm/single_node.sbatch")
  wait_for_path "$dir/adapt/checkpoints/checkpoint-3/trainer_state.json" "$id"
  if [ "$how" = cancel ]; then
    scancel "$id"
  else
    # The rank-1 worker of this job: among the job's processes (scontrol listpids), the one that
    # torchrun started with RANK=1.
    pid=""
    for p in $(scontrol listpids "$id" 2>/dev/null | awk 'NR > 1 {print $1}'); do
      if tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "RANK=1"; then pid=$p; fi
    done
    [ -n "$pid" ] || fail "no rank-1 worker of job $id found"
    kill -KILL "$pid"
  fi
  code=$(wait_job "$id" 120)
  step=$(last_checkpoint "$dir")
  [ ! -f "$dir/adapt/DONE" ] || fail "job $id finished adapt before it was interrupted; make the run longer"
  log "$how: job $id ended ($code) with its last checkpoint at step $step; resubmitting"
  id2=$(RUN_NAME=$how RUN_DIR=$dir OVERRIDES="$TINY $UP_TO_ADAPT" submit "${SINGLE[@]}" "$REPO/scripts/slurm/single_node.sbatch")
  code=$(wait_job "$id2")
  [ "$code" = "0:0" ] || fail "resubmitted job $id2 ended with exit code $code"
  grep -q "resuming from .*checkpoint-$step" "$dir/logs/pipeline.log" || fail "job $id2 did not resume from checkpoint-$step"
  same_weights "$ref/adapt/model" "$dir/adapt/model" || fail "the resumed run's weights differ from the uninterrupted run's"
  log "$how: ok, resumed from checkpoint-$step, same weights as the uninterrupted run ($((SECONDS - t0)) s)"
}

check_requeue() {
  local ref dir id code step saved t0=$SECONDS
  ref=$(reference_run)
  dir=$WORK/runs/requeue
  log "requeue: USR1 to the batch shell after the first checkpoint"
  id=$(RUN_NAME=requeue RUN_DIR=$dir OVERRIDES="$TINY $UP_TO_ADAPT" submit "${SINGLE[@]}" "$REPO/scripts/slurm/single_node.sbatch")
  wait_for_path "$dir/adapt/checkpoints/checkpoint-3/trainer_state.json" "$id"
  scancel --batch --signal=USR1 "$id"
  code=$(wait_job "$id" 900)
  [ "$code" = "0:0" ] || fail "requeued job $id ended with exit code $code"
  grep -q "requeueing job $id (the workers saved a checkpoint and stopped after USR1)" "pod-$id.log" \
    || fail "job $id did not save on USR1 and requeue"
  grep -q "job $id (restart 1)" "pod-$id.log" || fail "job $id did not restart after the requeue"
  saved=$(grep -o "appeared: saving checkpoint-[0-9]*" "$dir/logs/pipeline.log" | sed 's/.*checkpoint-//' | head -1)
  step=$(grep -o "resuming from .*checkpoint-[0-9]*" "$dir/logs/pipeline.log" | sed 's/.*checkpoint-//' | tail -1)
  [ -n "$step" ] || fail "the requeued job did not resume from a checkpoint"
  # USR1 came after checkpoint-3: the workers saved at the step they were in (> 3, off the every-3 schedule
  # unless it happened to be 6), and the restart resumed there, not from checkpoint-3.
  if [ -z "$saved" ] || [ "$saved" -le 3 ] || [ "$step" != "$saved" ]; then
    fail "expected a save on USR1 after step 3 and a resume from it, got saved=${saved:-none} resumed=$step"
  fi
  [ ! -e "$REPO/.pod-slurm/stop-$id" ] || fail "the stop file of job $id was not consumed"
  same_weights "$ref/adapt/model" "$dir/adapt/model" || fail "the requeued run's weights differ from the uninterrupted run's"
  log "requeue: ok, restarted as job $id (restart 1), resumed from checkpoint-$step, same weights ($((SECONDS - t0)) s)"
}

check_badconfig() {
  log "badconfig: a misspelt override and a missing data file must fail the job fast"
  local id code t0=$SECONDS
  id=$(RUN_NAME=bad RUN_DIR=$WORK/runs/bad OVERRIDES="$TINY train.lrr=1" submit "${SINGLE[@]}" "$REPO/scripts/slurm/single_node.sbatch")
  code=$(wait_job "$id" 120)
  [ "$code" != "0:0" ] || fail "job $id with a bad override succeeded"
  grep -q "Key 'lrr' not in 'TrainConfig'" "pod-$id.log" || fail "job $id's log does not name the bad key: $(tail -n 5 "pod-$id.log")"
  log "badconfig: misspelt key: exit code $code after $((SECONDS - t0)) s; in the log: $(grep -m1 "Key 'lrr'" "pod-$id.log")"
  t0=$SECONDS
  id=$(RUN_NAME=nodata RUN_DIR=$WORK/runs/nodata OVERRIDES="$TINY data.sources=[$WORK/missing.jsonl]" \
    submit "${SINGLE[@]}" "$REPO/scripts/slurm/single_node.sbatch")
  code=$(wait_job "$id" 120)
  [ "$code" != "0:0" ] || fail "job $id with a missing data file succeeded"
  grep -q "^error: data.sources.*missing.jsonl" "pod-$id.log" || fail "job $id's log does not name the missing file: $(tail -n 5 "pod-$id.log")"
  log "badconfig: missing data: exit code $code after $((SECONDS - t0)) s; in the log: $(grep -m1 -o "error: data.sources[^:]*: file not found" "pod-$id.log")"
  log "badconfig: ok"
}

t_start=$SECONDS
for check in "${checks[@]}"; do
  case "$check" in
    single) check_single ;;
    multi) check_multi ;;
    cancel) check_interrupt cancel ;;
    kill) check_interrupt kill ;;
    requeue) check_requeue ;;
    badconfig) check_badconfig ;;
  esac
done
log "all passed: ${checks[*]} ($((SECONDS - t_start)) s)"
