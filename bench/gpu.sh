#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md in one unattended call, from a clean checkout on a machine with one NVIDIA
# H100/H200 (about 5 to 8 minutes on a fresh machine, most of it the install):
#
#   bash bench/gpu.sh             install what is missing, then `python -m bench.gpu` (its section of RESULTS.md)
#   bash bench/gpu.sh --smoke     no install, tiny shapes, any machine (CPU too): the whole chain in seconds
#
# Which Python runs it: $PYTHON (default python3) as it is when JAX there already sees the GPU and PyTorch sees CUDA
# (a prepared image; only missing pure-Python packages are added), else the virtual environment $VENV (default
# .venv-gpu), made and filled on first use: `pip install -e ".[test]"`, jax[cuda13] (driver >= 580) or jax[cuda12]
# at the version pinned in bench/gpu-constraints.txt, and the registry's default CUDA build of torch.
# WHEELS=DIR installs from a folder of wheels instead of the registry (a machine without network).
# BUDGET_S (default 480): the benchmark is stopped when the whole call would run longer. Other arguments go to
# bench.gpu (--batch, --seq, --steps, --repeats, --results, --json).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
log() { echo "[bench/gpu.sh +$((SECONDS - start))s] $*" >&2; }
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
BUDGET_S=${BUDGET_S:-480}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}

for arg in "$@"; do
  if [[ $arg == --smoke ]]; then
    exec "$PYTHON" -m bench.gpu "$@"
  fi
done

pip_args=(-q --disable-pip-version-check)
if [[ -n ${WHEELS:-} ]]; then
  pip_args+=(--no-index --find-links "$WHEELS")
fi

sees_gpu() {  # JAX on a GPU and PyTorch on CUDA in python $1
  "$1" -c 'import sys, jax, torch; sys.exit(0 if jax.default_backend() == "gpu" and torch.cuda.is_available() else 1)' \
    >/dev/null 2>&1
}

missing() {  # the distributions of the pure-Python imports dontstop-jax needs that python $1 lacks
  "$1" - <<'EOF'
import importlib
needed = {"flax": "flax", "optax": "optax", "orbax.checkpoint": "orbax-checkpoint", "ml_collections": "ml_collections",
          "transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors", "regex": "regex",
          "tqdm": "tqdm"}
absent = []
for module, dist in needed.items():
    try:
        importlib.import_module(module)
    except Exception:
        absent.append(dist)
print(" ".join(absent))
EOF
}

new_enough() {  # python $1 is >= 3.11 (pyproject's requires-python)
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

if ! command -v nvidia-smi >/dev/null; then
  log "no NVIDIA driver here (nvidia-smi not found); run on a GPU machine, or pass --smoke"
  exit 1
fi
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
log "GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1), driver $driver"

if sees_gpu "$PYTHON"; then
  py=$PYTHON
  read -r -a absent <<<"$(missing "$py")"
  if (( ${#absent[@]} )); then
    log "adding to $py: ${absent[*]}"  # unpinned: the image's jax and torch stay as they are
    "$py" -m pip install "${pip_args[@]}" "${absent[@]}"
  fi
  log "using $py as it is: JAX sees the GPU and PyTorch sees CUDA"
elif [[ -x $VENV/bin/python ]] && sees_gpu "$VENV/bin/python"; then
  py=$VENV/bin/python
  log "using $VENV from an earlier call"
else
  base=""
  for candidate in "$PYTHON" python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null && new_enough "$candidate"; then base=$candidate; break; fi
  done
  if [[ -z $base ]]; then
    log "no Python >= 3.11 found (set PYTHON=...)"
    exit 1
  fi
  cuda=12
  if (( ${driver%%.*} >= 580 )); then cuda=13; fi
  jax_version=$(sed -n 's/^jax==//p' bench/gpu-constraints.txt)
  log "installing into $VENV with $base: dontstop-jax[test], jax[cuda$cuda]==$jax_version, torch (CUDA build)"
  "$base" -m venv "$VENV" || { "$base" -m pip install -q --user virtualenv && "$base" -m virtualenv -q "$VENV"; }
  py=$VENV/bin/python
  "$py" -m pip install "${pip_args[@]}" -c bench/gpu-constraints.txt -e ".[test]" "jax[cuda$cuda]==$jax_version" torch
  if ! sees_gpu "$py"; then
    log "after the install JAX or PyTorch still sees no GPU:"
    "$py" -c 'import jax, torch; print("jax", jax.__version__, jax.devices()); print("torch", torch.__version__, torch.version.cuda, torch.cuda.is_available())' || true
    exit 1
  fi
fi

left=$((BUDGET_S - (SECONDS - start)))
if (( left < 60 )); then
  log "only ${left}s of the ${BUDGET_S}s budget left after the install; rerun (the environment is ready now)"
  exit 1
fi
log "benchmark (stopped after ${left}s at most): $py -m bench.gpu $*"
timeout "$left" "$py" -m bench.gpu "$@"
log "done in $((SECONDS - start))s"
