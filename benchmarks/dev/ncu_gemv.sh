#!/usr/bin/env bash
# Nsight Compute profile of the batch-1 GEMV kernels (both stages of the third of three calls) on the
# lent GPU: where a call's time goes (duration, issue utilisation, stall reasons, occupancy).
#   bash benchmarks/dev/ncu_gemv.sh OUT_DIR [VARIANT]   (VARIANT: a name from layer_kernels.py named_variants)
# Two-launch configurations only: it skips the first two calls' 4 kernels and profiles the next 2.
set -euo pipefail
out=${1:?usage: ncu_gemv.sh OUT_DIR [VARIANT]}
variant=${2:-}
ncu=${NCU:-/usr/local/cuda/bin/ncu}
mkdir -p "$out"
for case in 8192,28672,0.1,1 8192,28672,1.0,1 4096,4096,0.55,1; do
  extra=()
  [ -n "$variant" ] && extra=(--single-variant "$variant")
  "$ncu" --launch-skip 4 --launch-count 2 -k regex:_gemv \
    --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
    --section LaunchStats --section MemoryWorkloadAnalysis \
    python benchmarks/layer_kernels.py --single "$case" "${extra[@]}" > "$out/ncu_${case//,/_}${variant:+_$variant}.txt" 2>&1 \
    || echo "ncu failed on $case (see the file)"
  grep -E "_gemv|Duration|Issue Slots Busy|Achieved Occupancy|Registers Per|No Eligible|Stall|Memory Throughput" \
    "$out/ncu_${case//,/_}${variant:+_$variant}.txt" | head -40 || true
done
