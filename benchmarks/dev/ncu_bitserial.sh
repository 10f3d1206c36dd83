#!/usr/bin/env bash
# Nsight Compute on the bit-serial batch-1 call (benchmarks/layer_kernels.py --single): the stage-2 kernel
# (littlebit_bitserial_gemv) of the third call, with the sections that say where its time goes; the
# same for the Triton stage 1 that ends in the planes of t (_gemv_v_kernel).
#   bash benchmarks/dev/ncu_bitserial.sh OUT_DIR D_IN,D_OUT,BPW [VARIANT...] (VARIANT: a layer_kernels.py variant)
set -euo pipefail
out=${1:?usage: ncu_bitserial.sh OUT_DIR D_IN,D_OUT,BPW [VARIANT...]}
case=${2:?}
shift 2
ncu=${NCU:-/usr/local/cuda/bin/ncu}
mkdir -p "$out"
for variant in default "$@"; do
  extra=()
  [ "$variant" != default ] && extra=(--single-variant "$variant")
  for kernel in littlebit_bitserial_gemv _gemv_v_kernel; do
    f="$out/bitserial_${case//,/_}_${variant}_$kernel.txt"
    "$ncu" --launch-skip 2 --launch-count 1 -k "regex:$kernel" \
      --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section LaunchStats --section SourceCounters \
      python benchmarks/layer_kernels.py --single "$case,1" "${extra[@]}" > "$f" 2>&1 || echo "ncu failed: $variant $kernel"
    echo "== $case $variant $kernel"
    grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Theoretical Occupancy|Issued Warp|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|Registers Per|Block Limit|Grid Size|Waves Per SM|Stall|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Mem Pipes|L1/TEX Cache Throughput|L2 Cache Throughput" "$f" | head -60
  done
done
