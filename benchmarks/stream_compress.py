"""Streamed compression of a big synthetic checkpoint: time, peak RSS, peak GPU memory, BPW, sizes.

Writes a Llama-shaped bf16 checkpoint (``synthetic_checkpoint``) under ``--workdir``, compresses it
a decoder layer at a time in a child process (so the peak RSS is that of the compression alone),
then loads the result through ``from_pretrained`` in another child and runs a forward pass.
With ``--layers N`` on a deep shape, only N layers are written and the whole model's time is
extrapolated from them.

    python benchmarks/stream_compress.py --shape llama2-7b --bpw 0.55 --threads 2 --workdir /tmp/lb7b
    python benchmarks/stream_compress.py --device cuda --shape llama2-70b --layers 4 --workdir $TMP/l70
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import write_results
from synthetic_checkpoint import SHAPES, write_checkpoint


def _peaks(device: str) -> dict:
    import torch

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    peaks = {"peak_rss_kib": kib, "peak_rss_gb": kib * 1024 / 1e9}
    if device.startswith("cuda"):
        peaks["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return peaks


def child_compress(a: argparse.Namespace) -> dict:
    import torch

    from littlebit.config import LittleBitConfig
    from littlebit.hf.streaming import compress_streamed

    torch.set_num_threads(a.threads)
    hooks = _reconstruction(a) if a.reconstruct else None
    t0 = time.perf_counter()
    config = LittleBitConfig(bpw=a.bpw)
    report = compress_streamed(a.source, a.out, config, compute_device=a.device, hooks=hooks)
    seconds = time.perf_counter() - t0
    record = {"compress_s": seconds, "bpw_linear": report.bpw_linear, "bpw_total": report.bpw_total,
              "compressed_layers": len(report.layers), **_peaks(a.device)}  # fmt: skip
    if hooks is not None:
        record["block_losses"] = hooks.losses
    return record


def _reconstruction(a: argparse.Namespace):
    """Block reconstruction on random token ids: the synthetic model has no tokenizer, and time and
    memory depend on the number and length of the sequences, not on their text."""
    import torch

    from littlebit.training.config import BlockConfig
    from littlebit.training.streamed_blocks import StreamedBlockReconstruction

    vocab = json.loads((Path(a.source) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (a.sequences, a.seqlen), generator=torch.Generator().manual_seed(0))
    block = BlockConfig(sequences=a.sequences, epochs=a.epochs, batch_size=a.batch_size)
    return StreamedBlockReconstruction(ids, block, device=a.device)


def child_load(a: argparse.Namespace) -> dict:
    import torch

    from littlebit.hf.checkpoint import load_compressed

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = load_compressed(a.out, device=a.device)  # digests checked
    t1 = time.perf_counter()
    with torch.no_grad():
        logits = model(torch.arange(1, 17, device=a.device).unsqueeze(0)).logits
    return {"load_s": t1 - t0, "forward_16_tokens_s": time.perf_counter() - t1,
            "logits_finite": bool(torch.isfinite(logits).all()), **_peaks(a.device)}  # fmt: skip


def _run_child(kind: str, a: argparse.Namespace, source: Path, out: Path, work: Path) -> dict:
    result = work / f"{kind}.json"
    cmd = [sys.executable, __file__, "--child", kind, "--source", str(source), "--out", str(out)]
    cmd += ["--bpw", str(a.bpw), "--device", a.device, "--threads", str(a.threads), "--result", str(result)]
    if kind == "compress" and a.reconstruct:
        cmd += ["--reconstruct", "--sequences", str(a.sequences), "--seqlen", str(a.seqlen)]
        cmd += ["--epochs", str(a.epochs), "--batch-size", str(a.batch_size)]
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text())


def _gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    p.add_argument("--layers", type=int, help="decoder layers to write and compress (default: all)")
    p.add_argument("--bpw", type=float, default=0.55)
    p.add_argument("--device", default="cpu", help="where the factors are initialised: cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--workdir", help="scratch directory for the checkpoints (removed after)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    p.add_argument("--name", help="results file name (default: stream_compress_<device>[_<shape>])")
    p.add_argument("--reconstruct", action="store_true", help="fit each layer as it is compressed")
    p.add_argument("--sequences", type=int, default=256, help="calibration sequences (reconstruction)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--epochs", type=int, default=4, help="passes over the calibration set per layer")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per reconstruction step")
    p.add_argument("--child", choices=("compress", "load"), help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        record = (child_compress if a.child == "compress" else child_load)(a)
        Path(a.result).write_text(json.dumps(record))
        return
    if not a.workdir:
        p.error("--workdir is required")

    import torch

    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    full_layers = SHAPES[a.shape]["num_hidden_layers"]
    layers = a.layers or full_layers
    # one source per shape and depth, so --keep lets later runs reuse it
    source, out = work / f"source-{a.shape}-{layers}", work / "compressed"
    suffix = "" if a.shape == "llama2-7b" and layers == full_layers else f"_{a.shape}_{layers}l"
    what = "reconstruct" if a.reconstruct else "compress"
    name = a.name or f"stream_{what}_{'cuda' if a.device.startswith('cuda') else 'cpu'}{suffix}"
    try:
        t0 = time.perf_counter()
        if not source.is_dir():
            write_checkpoint(source, a.shape, layers, "cuda" if a.device.startswith("cuda") else "cpu")
        generate_s = time.perf_counter() - t0
        for stale in (out, work / f".{out.name}.partial"):  # an earlier, interrupted run's output
            shutil.rmtree(stale, ignore_errors=True)
        compress = _run_child("compress", a, source, out, work)
        record = {
            "shape": a.shape,
            "layers": layers,
            "full_layers": full_layers,
            "bpw_target": a.bpw,
            "device": a.device,
            "threads": a.threads,
            "generate_s": generate_s,
            "source_gb": _gb(source),
            "compressed_gb": _gb(out),
            **compress,
            "compress_per_layer_s": compress["compress_s"] / layers,
            "compress_full_model_s": compress["compress_s"] / layers * full_layers,
            "reconstruct": a.reconstruct,
            **(
                {"sequences": a.sequences, "seqlen": a.seqlen, "epochs": a.epochs, "batch_size": a.batch_size}
                if a.reconstruct
                else {}
            ),  # fmt: skip
            "load": None,  # filled in by the load check below
            "load_checked": False,
        }
        # Written before the load check too, so a run stopped during it keeps its measurement.
        write_results(name, [record])
        record["load"] = load = _run_child("load", a, source, out, work)
        record["load_checked"] = True
        path = write_results(name, [record])
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = [
        ("shape", f"{a.shape} ({layers}/{full_layers} layers)"),
        ("source (bf16)", f"{record['source_gb']:.2f} GB"),
        ("compressed", f"{record['compressed_gb']:.3f} GB"),
        ("BPW linear / all", f"{record['bpw_linear']:.4f} / {record['bpw_total']:.4f}"),
        (f"{what} time", f"{record['compress_s']:.0f} s ({record['compress_per_layer_s']:.1f} s/layer)"),
        ("whole-model estimate", f"{record['compress_full_model_s'] / 3600:.2f} h"),
        (f"peak RSS {what}", f"{record['peak_rss_gb']:.2f} GB"),
        ("peak RSS load+forward", f"{load['peak_rss_gb']:.2f} GB"),
    ]
    if "peak_gpu_gb" in record:
        rows.append((f"peak GPU {what}", f"{record['peak_gpu_gb']:.2f} GB"))
    rows.append(("loads, finite logits", str(load["logits_finite"])))
    for k, v in rows:
        print(f"{k:<24} {v}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
