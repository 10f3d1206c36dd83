#!/usr/bin/env bash
# Why the batch-1 GEMV stages stall: Nsight Compute's per-reason stall counts for both stages of the
# third of three calls, one file per case and variant.
#   bash benchmarks/dev/ncu_stalls.sh OUT_DIR VARIANT... (VARIANT: a layer_kernels.py named variant, or "default")
# Two-launch configurations only: it skips the first two calls' 4 kernels and profiles the next 2.
set -euo pipefail
out=${1:?usage: ncu_stalls.sh OUT_DIR VARIANT...}
shift
ncu=${NCU:-/usr/local/cuda/bin/ncu}
mkdir -p "$out"
for variant in "$@"; do
  for case in 8192,28672,0.1,1 4096,4096,0.55,1; do
    extra=()
    [ "$variant" != default ] && extra=(--single-variant "$variant")
    f="$out/stalls_${case//,/_}_$variant.txt"
    "$ncu" --launch-skip 4 --launch-count 2 -k regex:_gemv \
      --metrics "gpu__time_duration.sum,smsp__inst_executed.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      python benchmarks/layer_kernels.py --single "$case" "${extra[@]}" > "$f" 2>&1 || echo "ncu failed on $case $variant"
    echo "== $case $variant"
    awk '/_gemv_/{print $1} /gpu__time_duration|inst_executed/{print "   ", $1, $NF} /stalled/ && $NF+0 > 0.3 {print "   ", $1, $NF}' "$f"
  done
done
