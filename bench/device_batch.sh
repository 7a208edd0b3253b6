#!/bin/bash
# Several bench commands in one call of the lent GPU machine (a call's start costs minutes of a 30-minute
# session budget, so runs that need the same machine go together). Carry `.devcarry` (ignored): its whl/
# holds `pip download --no-deps` wheels of rdquant's dependencies for cp311 and cp312.
#   bash bench/device_batch.sh "SECONDS COMMAND..." "SECONDS COMMAND..." ...
# Each part runs under `timeout SECONDS` with src/ on the path; its log goes to $OUT/partN.log and the
# batch goes on after a part fails or times out (the summary line at the end says which did).
# Commands may write JSON under $OUT (e.g. `--json $OUT/speed.json`).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SITE=/tmp/rdq-site
source bench/device_wheels.sh
install_wheels || exit 2
export PYTHONPATH=$SITE:$PWD/src PYTHONUNBUFFERED=1 OUT
n=0; summary=""
for part in "$@"; do
  n=$((n + 1)); secs=${part%% *}; cmd=${part#* }
  echo "=== part $n (<= ${secs}s): $cmd"
  t0=$(date +%s)
  timeout "$secs" bash -c "$cmd" 2>&1 | tee "$OUT/part$n.log"
  rc=${PIPESTATUS[0]}
  summary="$summary part$n:rc=$rc,$(( $(date +%s) - t0 ))s"
done
echo "=== done:$summary"
