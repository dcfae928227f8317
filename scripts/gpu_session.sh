#!/usr/bin/env bash
# One GPU session's measurements, as one prepared command for the lent machine (torch, no
# diffusers, no network). First, here: `bash scripts/gpu_prepare.sh` (wheels into .whl/). Then
# the device tool's run, carrying .whl, with a timeout that leaves time for a rerun:
#
#   bash scripts/gpu_session.sh sd3 flux     # sd3: about 4 minutes on an H200 (whole graphs, 2026-12-04)
#
# Each job writes its table and log to $OUT (else ./gpu_out) and stops at its own time limit,
# keeping what it measured (gpu_latency.py writes its table after every mode). Jobs, in the
# order worth running them:
#   sd3        SD3-medium: eager, specdiff (defaults: regions on a GPU), Inductor; per-call split
#   flux       FLUX.1-dev: specdiff (defaults), eager; one timed generation each
#   sd3_whole  SD3-medium: specdiff with whole graphs (regional_compile=False), per-call split:
#              what compiling block by block costs per call against sd3's specdiff row
#   sd3_busy   SD3-medium: specdiff and Inductor, the device's busy time per call kind under
#              torch.profiler (--device-time): host-bound calls (device idle) against device-bound
#   sd3_cpp    SD3-medium: specdiff and Inductor with Inductor's C++ wrapper (cpp_wrapper: kernels
#              launched from C++, not Python), per-call split: what launching costs a cached call
#   check      correctness on the device's kernels (benchmarks/gpu_check.py): tiny SD3 and FLUX,
#              bfloat16 and float32; cache_ratio=0 and the sparse variant computing every token
#              against eager, as closely as plain Inductor; exit 1 if a check fails
#
# --dry-run: the same jobs on this CPU with gpu_latency.py's tiny configs and no wheels (what
# CI checks; seconds).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
[[ $# -gt 0 ]] || { echo "usage: $0 [--dry-run] JOB... (jobs: sd3 flux sd3_whole sd3_busy sd3_cpp check)" >&2; exit 2; }
for job in "$@"; do
  case "$job" in
    sd3|flux|sd3_whole|sd3_busy|sd3_cpp|check) ;;
    *) echo "gpu_session: unknown job '$job' (jobs: sd3 flux sd3_whole sd3_busy sd3_cpp check)" >&2; exit 2 ;;
  esac
done
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

if [[ $dry == 1 ]]; then
  py="${PYTHON:-python}"
  extra=(--dry-run)
else
  py=python3
  extra=()
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_session: installing .whl/ failed (run scripts/gpu_prepare.sh here and carry .whl)" >&2; exit 2; }
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
fi

status=0
run() {  # run NAME LIMIT_SECONDS ARGS...: one gpu_latency.py (job check: gpu_check.py) invocation, its table and log under $out
  local name=$1 limit=$2; shift 2
  local script=benchmarks/gpu_latency.py
  [[ $name == check ]] && script=benchmarks/gpu_check.py
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$py" "$script" "${extra[@]}" --out "$out/$name.md" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  [[ $rc == 0 ]] || { echo "== $name: exit $rc (124: its time limit; the table keeps the modes it finished)"; status=1; }
}

for job in "$@"; do
  case "$job" in
    sd3) run sd3 300 --models sd3 --modes eager,specdiff,inductor --split ;;
    flux) run flux 240 --models flux --modes specdiff,eager --timed 1 ;;
    sd3_whole) run sd3_whole 240 --models sd3 --modes specdiff --split --specdiff-options '{"regional_compile": false}' ;;
    sd3_busy) run sd3_busy 240 --models sd3 --modes specdiff,inductor --timed 1 --device-time ;;
    sd3_cpp) run sd3_cpp 300 --models sd3 --modes specdiff,inductor --timed 1 --split --inductor-config '{"cpp_wrapper": true}' ;;
    check) run check 240 ;;
  esac
done
exit $status
