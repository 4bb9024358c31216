#!/usr/bin/env bash
# Run (or resume) a set of training runs on the device, building the extension first unless
# this machine already holds a CUDA build, and pack what comes back into one file:
#   bash scripts/device_sweep.sh RUNS.json DIR SECONDS [--resume]
# The runs' checkpoints stay in DIR on the machine (for a later --resume while it is warm);
# $OUT gets DIR without them, as DIR.tgz, and the log.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=$1 dir=$2 budget=$3; shift 3
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
if ! python3 -c "import cram_ext, sys; sys.exit('cuda' not in cram_ext.build_info()['backends'])" 2>/dev/null; then
  STAGE_TIMEOUT=300 bash scripts/device_check.sh build > "$OUT/build.txt" 2>&1
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} CC=/usr/bin/gcc CXX=/usr/bin/g++
python3 scripts/run_many.py "$runs" --out "$dir" --jobs "${JOBS:-8}" --time-budget "$budget" "$@" 2>&1 | tee "$OUT/sweep.log"
tar czf "$OUT/$(basename "$dir").tgz" --exclude='*.pt' "$dir"
