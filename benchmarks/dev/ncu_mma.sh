#!/usr/bin/env bash
# Nsight Compute on the tensor-core stage 2 alone (benchmarks/dev/mma_stage2.py --single): the third call
# of each tile, with the sections that say where its time goes.
#   bash benchmarks/dev/ncu_mma.sh OUT_DIR D_IN,D_OUT,BPW TILE... (TILE: mt-wpt-warps)
set -euo pipefail
out=${1:?usage: ncu_mma.sh OUT_DIR D_IN,D_OUT,BPW TILE...}
case=${2:?}
shift 2
ncu=${NCU:-/usr/local/cuda/bin/ncu}
mkdir -p "$out"
for tile in "$@"; do
  f="$out/mma_${case//,/_}_$tile.txt"
  "$ncu" --launch-skip 2 --launch-count 1 -k littlebit_stage2_mma \
    --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section LaunchStats \
    python benchmarks/dev/mma_stage2.py --single "$case" --tiles "$tile" > "$f" 2>&1 || echo "ncu failed on $tile"
  echo "== $case $tile"
  grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Theoretical Occupancy|Issued Warp|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|Registers Per|Stall|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth" "$f" | head -40
done
