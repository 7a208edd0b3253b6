#!/bin/bash
# GPU memory of the 8B shape's block step, in one call of the lent GPU machine (carry .devcarry/whl, and the
# "before" tree when comparing): the solve alone (bench/solve_memory.py --device cuda, the allocator's peak with
# cuSOLVER's workspaces) and 2-layer runs of bench/scale.py with --phase-peaks (the peak is per block), default
# and low-memory (--activations cpu) settings, with and without expandable segments. Rows go to $OUT/*.json.
#   bash bench/device_memory.sh [BEFORE_SRC]      BEFORE_SRC: e.g. .devcarry/before/src (git archive REV src)
# Each part is short (~30 s); the whole call stays under ten minutes.
set -u
S="python bench/scale.py --shape 8b --layers 2 --methods gptq --phase-peaks"
J='--json $OUT/scale2.json'
parts=(
  "60 python bench/solve_memory.py --rows 4096 --cols 14336 --methods gptq claq --device cuda --json \$OUT/solve_after.json"
  "70 $S --label after-default $J"
  "70 $S --activations cpu --batch 4 --label after-cpu-b4 $J"
  "70 $S --activations cpu --batch 1 --label after-cpu-b1 $J"
  "70 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $S --activations cpu --batch 4 --label after-cpu-b4-expandable $J"
)
if [ $# -ge 1 ]; then
  B="PYTHONPATH=/tmp/rdq-site:$PWD/$1"
  parts+=(
    "60 $B python bench/solve_memory.py --rows 4096 --cols 14336 --methods gptq claq --device cuda --json \$OUT/solve_before.json"
    "70 $B $S --label before-default $J"
    "70 $B $S --activations cpu --batch 4 --label before-cpu-b4 $J"
  )
fi
bash bench/device_batch.sh "${parts[@]}"
