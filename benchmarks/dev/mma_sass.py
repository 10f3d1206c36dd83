"""SASS instruction counts of the tensor-core stage 2 (``kernels.cuda_mma``), shipped and mask-decoding.

    LITTLEBIT_NVRTC=/path/libnvrtc.so python benchmarks/dev/mma_sass.py [--tiles 2-1-8,4-1-4] [--arch 90]

No GPU needed: NVRTC compiles each tile to a cubin and ``cuobjdump -sass`` (Triton ships one) lists
it. Per kernel it reports all instructions, the HMMAs, the most frequent opcodes, and the instructions
between the last HMMA of one unit and the first of the next (the software-pipelined loop's
bookkeeping: next unit's addresses and loads, the unit stepping, the fold into the row sums).
Writes ``benchmarks/results/mma_sass.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # layer_kernels.py
sys.path.insert(0, str(Path(__file__).parent))
from layer_kernels import import_kernel  # noqa: E402
from mask_decode_probe import mask_source  # noqa: E402

OPCODE = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def count(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        run = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True)
    sass = run.stdout
    ops = [m.group(1) for line in sass.splitlines() if (m := OPCODE.search(line))]
    hmma = [i for i, op in enumerate(ops) if op == "HMMA"]
    per_unit = len(hmma) // 2  # the pipelined loop holds two copies of a unit's decoding
    gap = hmma[per_unit] - hmma[per_unit - 1] - 1 if per_unit else 0
    top = collections.Counter(ops).most_common(8)
    return {"instructions": len(ops), "hmma": len(hmma), "between_units": gap, "top": dict(top)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", default="2-1-8,4-1-4,1-2-8", help="mt-wpt-warps,...")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mma_sass.json"))
    args = ap.parse_args()
    mma = import_kernel("cuda_mma")
    records = []
    for spec in args.tiles.split(","):
        mt, wpt, warps = (int(v) for v in spec.split("-"))
        for name, source in [("shipped", None), ("mask", mask_source(mma))]:
            rec = {"tile": spec, "kernel": name, "arch": args.arch}
            rec |= count(mma.compile_cubin(mma.MmaTile(mt, wpt, warps), args.arch, source))
            records.append(rec)
            print(
                f"tile {spec} {name:8s}: {rec['instructions']} instructions, {rec['hmma']} HMMA, "
                f"{rec['between_units']} between units; {rec['top']}",
                flush=True,
            )
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
