#!/usr/bin/env bash
# Launch a `dontstop` command on many devices: one process per host, joined by dontstop_jax/distributed.py.
# Run `launch/run.sh --help` for the modes and examples.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/run.sh MODE [launcher options] COMMAND [dontstop arguments...]

Runs `python -m dontstop_jax COMMAND ARGS...` (COMMAND: pretrain, finetune, grid, prepare, ...) once per
process; the command, --config and every --config.* override pass through unchanged. The first argument
that is not a launcher option (or everything after `--`) starts the dontstop command.

modes:
  local   N processes on this machine, M CPU devices each, coordinator on 127.0.0.1 (a free port): tests
          and rehearsing a multi-host run without a cluster. Logs: LOG_DIR/process-<i>.log (process 0 is
          also shown). Waits for all; SIGTERM/SIGINT are forwarded to every process (they checkpoint and
          exit 75); if one fails the others are stopped. Exit status: 0 when every process finished, else
          the first non-zero status (75 interrupted: rerun to continue; 2 bad input; 1 fault).
            launch/run.sh local --processes 2 --devices 2 pretrain --config configs/dapt.py:biomed \
                --config.mesh.shape='(4,1,1)'
  gpu     one host, all its GPUs, one process (JAX drives every local GPU; no coordinator needed).
            launch/run.sh gpu pretrain --config configs/dapt.py:biomed --config.mesh.shape='(-1,1,1)'
  slurm   srun, one process per node of the current allocation (run inside sbatch/salloc); jax reads
          ranks and the coordinator from SLURM and each process keeps all GPUs of its node.
          Logs: LOG_DIR/process-<task>.log.
            sbatch --nodes=4 --gpus-per-node=8 --wrap "launch/run.sh slurm pretrain \
                --config configs/dapt.py:biomed --config.mesh.shape='(4,8,1)'"
  tpu     every worker of a Cloud TPU VM slice over `gcloud compute tpus tpu-vm ssh --worker=all`; each
          worker cds to --repo (a checkout with the package installed), activates --venv if given, and
          runs the command with DONTSTOP_TPU=1 (jax finds its peers from TPU metadata). Output comes back
          tagged by worker and is split into LOG_DIR/worker-<i>.log here; worker 0 is also shown.
            launch/run.sh tpu --tpu my-v4-32 --zone us-central2-b --project my-proj --venv ~/venv \
                pretrain --config configs/dapt.py:biomed --config.mesh.shape='(4,4,1)'

options:
  --dry-run          print the exact commands and exit without running anything
  --log-dir DIR      where logs go, on this machine (default: logs/MODE-YYYYmmdd-HHMMSS)
  --python PATH      interpreter that runs `-m dontstop_jax` (default: python3)
  local:  --processes N (default 2), --devices M CPU devices per process (default 1),
          --port P coordinator port (default: a free one), --grace S seconds before a failed run's other
          processes are killed (default 30)
  slurm:  --srun-args "ARGS" extra srun arguments, word-split (e.g. "--gpus-per-node=8")
  tpu:    --tpu NAME, --zone ZONE, --project PROJECT (required), --repo DIR on the workers (default:
          dontstop-jax, relative to the home directory), --venv DIR to activate on the workers
EOF
}

die() { echo "run.sh: $*" >&2; exit 2; }
quote() { printf '%q ' "$@" | sed 's/ $//'; }
# A path for the workers' shell: quoted, but a leading ~/ is left for them to expand.
# shellcheck disable=SC2088
remote_path() { if [[ $1 == "~/"* ]]; then echo "~/$(quote "${1#"~/"}")"; else quote "$1"; fi; }

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case "$1" in
  -h|--help) usage; exit 0 ;;
  local|gpu|slurm|tpu) MODE=$1; shift ;;
  *) die "unknown mode '$1'; choose local, gpu, slurm or tpu (see --help)" ;;
esac

DRY_RUN=0 PYTHON=python3 LOG_DIR="" PROCESSES=2 DEVICES=1 PORT="" GRACE=30 SRUN_ARGS="" TPU="" ZONE="" PROJECT=""
REPO=dontstop-jax VENV=""
while [[ $# -gt 0 && $1 == --* ]]; do
  case "$1" in
    --) shift; break ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    -h|--help) usage; exit 0 ;;
  esac
  [[ $# -ge 2 ]] || die "$1 needs a value"
  case "$1" in
    --log-dir) LOG_DIR=$2 ;; --python) PYTHON=$2 ;; --processes) PROCESSES=$2 ;; --devices) DEVICES=$2 ;;
    --port) PORT=$2 ;; --grace) GRACE=$2 ;; --srun-args) SRUN_ARGS=$2 ;; --tpu) TPU=$2 ;; --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;; --repo) REPO=$2 ;; --venv) VENV=$2 ;;
    *) die "unknown launcher option $1; launcher options come before the dontstop command (see --help)" ;;
  esac
  shift 2
done
[[ $# -ge 1 ]] || die "no dontstop command given; e.g. launch/run.sh $MODE pretrain --config configs/dapt.py:biomed"
ARGS=("$@")
LOG_DIR=${LOG_DIR:-logs/$MODE-$(date +%Y%m%d-%H%M%S)}
for n in "$PROCESSES" "$DEVICES" "$GRACE"; do [[ $n =~ ^[1-9][0-9]*$ ]] || die "'$n' must be a positive integer"; done

# CMD = the command of process $1 (local and gpu modes).
process_command() {
  CMD=("$PYTHON" -m dontstop_jax "${ARGS[@]}")
  [[ $MODE == gpu ]] || CMD=(env "DONTSTOP_COORDINATOR=127.0.0.1:$PORT" "DONTSTOP_NUM_PROCESSES=$PROCESSES"
                             "DONTSTOP_PROCESS_ID=$1" "DONTSTOP_LOCAL_DEVICES=$DEVICES" "${CMD[@]}")
}

# Start the processes in the background, wait for all, forward SIGTERM/SIGINT, stop the rest when one fails.
# Process 0's output is also shown here.
run_processes() {
  local -A running=()
  local i status=0 finished rc killer="" stopping=0
  mkdir -p "$LOG_DIR"
  for ((i = 0; i < PROCESSES; i++)); do
    process_command "$i"
    if [[ $i == 0 ]]; then "${CMD[@]}" > >(tee "$LOG_DIR/process-0.log") 2>&1 &
    else "${CMD[@]}" >"$LOG_DIR/process-$i.log" 2>&1 &
    fi
    running[$!]=$i
  done
  trap 'stopping=1; kill -TERM "${!running[@]}" 2>/dev/null || true' TERM INT
  while [[ ${#running[@]} -gt 0 ]]; do
    finished="" rc=0
    wait -n -p finished "${!running[@]}" || rc=$?
    [[ -n ${finished:-} ]] || continue  # a forwarded signal interrupted the wait (and unset it)
    i=${running[$finished]}
    unset "running[$finished]"
    if [[ $rc != 0 && $status == 0 ]]; then
      status=$rc
      [[ $stopping == 0 ]] || continue  # stopped on request: each process says so itself
      echo "run.sh: process $i exited with $rc; stopping the others. Its log ($LOG_DIR/process-$i.log) ends:" >&2
      tail -n 20 "$LOG_DIR/process-$i.log" >&2
      if [[ ${#running[@]} -gt 0 ]]; then
        kill -TERM "${!running[@]}" 2>/dev/null || true
        (sleep "$GRACE"; kill -KILL "${!running[@]}" 2>/dev/null || true) >/dev/null 2>&1 &
        killer=$!
      fi
    fi
  done
  trap - TERM INT
  [[ -z $killer ]] || kill "$killer" 2>/dev/null || true
  echo "run.sh: logs in $LOG_DIR" >&2
  return "$status"
}

# Print each process's command exactly as run_processes runs it.
print_processes() {
  local i
  for ((i = 0; i < PROCESSES; i++)); do
    process_command "$i"
    if [[ $i == 0 ]]; then echo "$(quote "${CMD[@]}") > >(tee $(quote "$LOG_DIR/process-0.log")) 2>&1 &"
    else echo "$(quote "${CMD[@]}") > $(quote "$LOG_DIR/process-$i.log") 2>&1 &"
    fi
  done
  echo "wait"
}

case "$MODE" in
  local|gpu)
    if [[ $MODE == gpu ]]; then PROCESSES=1
    else PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')}
    fi
    if [[ $DRY_RUN == 1 ]]; then print_processes; else run_processes; fi
    ;;
  slurm)
    # shellcheck disable=SC2206  # --srun-args is word-split on purpose
    cmd=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 "--output=$LOG_DIR/process-%t.log" $SRUN_ARGS
         "$PYTHON" -m dontstop_jax "${ARGS[@]}")
    if [[ $DRY_RUN == 1 ]]; then echo "mkdir -p $(quote "$LOG_DIR")"; quote "${cmd[@]}"; echo; exit 0; fi
    mkdir -p "$LOG_DIR"
    exec "${cmd[@]}"
    ;;
  tpu)
    [[ -n $TPU && -n $ZONE && -n $PROJECT ]] || die "tpu mode needs --tpu NAME --zone ZONE --project PROJECT"
    metadata=http://metadata.google.internal/computeMetadata/v1/instance/attributes
    worker="\$(curl -s -H Metadata-Flavor:Google $metadata/agent-worker-number)"
    remote="set -o pipefail; cd $(remote_path "$REPO")"
    [[ -z $VENV ]] || remote+=" && source $(remote_path "$VENV")/bin/activate"
    remote+=" && W=$worker && DONTSTOP_TPU=1 $(quote "$PYTHON" -m dontstop_jax "${ARGS[@]}")"
    remote+=" 2>&1 | sed -u \"s/^/[worker \$W] /\""
    cmd=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --project "$PROJECT" --worker=all "--command=$remote")
    # shellcheck disable=SC2016  # awk's $0, not the shell's
    split='{ if (match($0, /^\[worker [0-9]+\] /)) { w = substr($0, 9, RLENGTH - 10); line = substr($0, RLENGTH + 1);
      print line > (dir "/worker-" w ".log"); fflush(); if (w == "0") print line } else print }'
    if [[ $DRY_RUN == 1 ]]; then
      echo "mkdir -p $(quote "$LOG_DIR")"; echo "$(quote "${cmd[@]}") 2>&1 | $(quote awk -v "dir=$LOG_DIR" "$split")"
      exit 0
    fi
    mkdir -p "$LOG_DIR"
    "${cmd[@]}" 2>&1 | awk -v "dir=$LOG_DIR" "$split"
    status=${PIPESTATUS[0]}
    echo "run.sh: per-worker logs in $LOG_DIR" >&2
    exit "$status"
    ;;
esac
