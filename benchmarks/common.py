"""Shared bits of the benchmark scripts: run from a checkout without installing littlebit."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "benchmarks" / "results"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def write_results(name: str, records: list[dict], **meta) -> Path:
    """Write ``benchmarks/results/NAME.json`` (and a copy under $OUT when run on the GPU machine)."""
    import torch

    payload = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        **meta,
        "records": records,
    }
    text = json.dumps(payload, indent=2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{name}.json").write_text(text)
    return path


def clock() -> float:
    """``time.perf_counter()`` once the GPU, if there is one, has finished the work queued so far."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def capture_step(step):
    """``step`` recorded as one CUDA graph (returned), after 3 warm-up calls on a side stream, as
    CUDA graphs need; a step that cannot be captured raises here."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
