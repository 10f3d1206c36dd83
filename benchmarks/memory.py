"""Memory of a Llama-2-7B-shaped model built directly in packed form.

For each BPW: build the model with random bits on the device (the FP16 model is never
materialised), save it in the packed format, load it back through transformers, and report bytes on
disk, resident device memory after loading, peak memory while loading, next to the FP16 size.
Prints a table, writes benchmarks/results/memory.json.

    python benchmarks/memory.py [--shape llama-2-7b] [--bpw 0.1,0.3,0.55,1.0]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
from pathlib import Path

import common
import torch

from littlebit.hf.checkpoint import load_compressed, save_compressed
from littlebit.hf.report import checkpoint_budget, memory_bytes, read_quant_config
from littlebit.runtime.synthetic import random_packed_llama


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-2-7b")
    p.add_argument("--bpw", default="0.1,0.3,0.55,1.0")
    p.add_argument("--layers", type=int, help="fewer decoder layers (quick checks)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = {"num_hidden_layers": args.layers} if args.layers else {}
    records = []
    for bpw in [float(b) for b in args.bpw.split(",")]:
        model = random_packed_llama(args.shape, bpw, device, torch.float16, **extra)
        built = memory_bytes(model)
        tmp = Path(tempfile.mkdtemp()) / "ckpt"
        save_compressed(model, tmp, dtype=None)
        # the parameter count of the dense model and the bytes on disk, as `littlebit info` reports them
        report, _, on_disk = checkpoint_budget(tmp, read_quant_config(tmp))
        n_params = report.n_params
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        loaded = load_compressed(tmp, device=device)
        rec = {
            "shape": args.shape,
            "bpw": bpw,
            "n_params": n_params,
            "fp16_bytes": 2 * n_params,
            "bytes_built": built,
            "bytes_on_disk": on_disk,
            "bytes_in_memory": memory_bytes(loaded),
        }
        if device == "cuda":
            torch.cuda.synchronize()
            rec["gpu_allocated_after_load"] = torch.cuda.memory_allocated() - before
            rec["gpu_peak_while_loading"] = torch.cuda.max_memory_allocated() - before
            x = torch.randint(0, 32000, (1, 16), device=device)
            with torch.no_grad():
                rec["logits_finite"] = bool(torch.isfinite(loaded(x).logits).all())
        records.append(rec)
        print(rec, flush=True)
        del loaded
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        shutil.rmtree(tmp.parent, ignore_errors=True)
    common.write_results("memory", records)
    gb = 1e9
    print(f"\n{'bpw':>5} {'FP16 GB':>8} {'disk GB':>8} {'GPU GB':>8} {'peak load GB':>13} {'ratio':>6}")
    for r in records:
        resident = r.get("gpu_allocated_after_load", r["bytes_in_memory"])
        print(
            f"{r['bpw']:>5} {r['fp16_bytes'] / gb:>8.2f} {r['bytes_on_disk'] / gb:>8.3f} "
            f"{resident / gb:>8.3f} "
            f"{r.get('gpu_peak_while_loading', 0) / gb:>13.3f} {r['fp16_bytes'] / resident:>6.1f}x"
        )


if __name__ == "__main__":
    main()
