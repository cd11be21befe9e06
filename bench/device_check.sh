#!/usr/bin/env bash
# One script that proves the CUDA code on a GPU machine, with no network, in under 8 minutes:
#   1. GPU, driver, torch and CUDA versions;  2. the tests marked `cuda`;  3. the annotation bench on the
#   device (tower alone, end to end from JPEG bytes with CPU and GPU decode; ViT-B-32, ViT-L-14);
#   4. the training steps AMP against fp32 for four families at 224 px.  Everything goes to one results file.
# Usage: bench/device_check.sh [--dry] [--out FILE]
#   --dry: the same steps on the CPU with tiny sizes (the cuda tests are collected, not run); CI runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: $0 [--dry] [--out FILE]" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT="${OUT:-.state/device-check/results-$(date -u +%Y%m%dT%H%M%SZ).txt}"
mkdir -p "$(dirname "$OUT")"
: > "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
FAILED=0
section() { echo "== $1 ==" | tee -a "$OUT"; }
OK_RC=0
run() {  # run <seconds> <command...>: output to the terminal and the results file; a failure is counted
  local limit="$1" started="$SECONDS"; shift
  timeout "$limit" "$@" 2>&1 | grep -v '^WARNING:root:No pretrained weights' | tee -a "$OUT"
  local rc="${PIPESTATUS[0]}"
  echo "-- exit $rc after $((SECONDS - started)) s: $*" | tee -a "$OUT"
  [ "$rc" -eq 0 ] || [ "$rc" -eq "$OK_RC" ] || FAILED=$((FAILED + 1))
  OK_RC=0
}

section "1. versions (dry: $DRY)"
command -v nvidia-smi >/dev/null 2>&1 && run 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# package versions without importing torch (seconds on a loaded CPU); the bench's "environment" line (section 3)
# prints what torch itself sees: CUDA runtime, cuDNN, the GPU and its compute capability
run 30 "$PY" -c 'from importlib.metadata import version as v; print("torch", v("torch"), "torchvision", v("torchvision"), "timm", v("timm"), "open_clip", v("open_clip_torch"))'
if [ "$DRY" -eq 0 ]; then
  run 60 "$PY" -c 'import torch; print("cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "available", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
fi

BENCH_LOG=""
if [ "$DRY" -eq 1 ]; then
  # --dry (CPU only): the bench runs beside the collection of the cuda tests, so the two processes' imports overlap
  # on a second core; its output goes into the results file in section order
  BENCH_LOG="$(mktemp)"
  ( started=$SECONDS; timeout 300 "$PY" bench/device.py --dry > "$BENCH_LOG" 2>&1; echo "$? $((SECONDS - started))" > "$BENCH_LOG.rc" ) &
  BENCH_PID=$!
  trap 'kill "$BENCH_PID" 2>/dev/null; rm -f "$BENCH_LOG" "$BENCH_LOG.rc"' EXIT
fi

section "2. tests marked cuda"
if [ "$DRY" -eq 1 ]; then
  OK_RC=5  # no CUDA: every test is deselected (pytest's "no tests collected"), and the summary says how many
  run 120 "$PY" -m pytest -q -p no:cacheprovider -p no:hypothesispytest --collect-only -m cuda tests/cuda
else
  run 300 "$PY" -m pytest -q -p no:cacheprovider -p no:hypothesispytest -s -m cuda tests/cuda
fi

section "3+4. annotation and training bench on the device"
if [ "$DRY" -eq 1 ]; then
  wait "$BENCH_PID"
  grep -v '^WARNING:root:No pretrained weights' "$BENCH_LOG" | tee -a "$OUT"
  read -r rc took < "$BENCH_LOG.rc" || { rc=1; took="?"; }
  echo "-- exit $rc after $took s (beside section 2): $PY bench/device.py --dry" | tee -a "$OUT"
  [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
else
  run 330 "$PY" bench/device.py --seconds 8
fi

section "result: $FAILED failed step(s); results in $OUT"
echo "$OUT"
[ "$FAILED" -eq 0 ]
