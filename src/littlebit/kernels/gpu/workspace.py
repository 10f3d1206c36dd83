"""The GPU path's cached workspaces (t, partial sums, bit planes, tickets), one per device, stream and
scheme, kept valid for CUDA-graph replays."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from littlebit.kernels.gpu.tiles import _pow2_at_least

# Stage 1 adds into t with atomics, so t must be zero where a call adds. Instead of a launch that
# clears it, t is a persistent workspace ("two"): kept all zero between calls, the last stage-2 program
# to finish zeroes the part it used and resets a ticket counter (``_gemv._release_t``). Calls on one
# stream run one after the other, so one workspace per (device, stream, scheme) is enough.
_ZERO_BLOCK = 1024  # floats the zeroing program clears per step


@dataclass
class _Workspace:
    t: torch.Tensor  # fp32; "two": all zero between calls; "reduce" and "bits": t then stage 1's
    # partial sums and bit planes, any values between calls
    counter: torch.Tensor  # int32; "two": (1,) zero between calls; "reduce": one ticket per stage-1
    # row block (or block of 256 rows), zero between calls
    cap: int  # floats per call


_WORKSPACES: dict[tuple[torch.device, int | None, str], _Workspace] = {}
# Buffers replaced by larger ones are kept: a CUDA graph goes on using the addresses it captured.
_RETIRED: list[torch.Tensor] = []


def _new_workspace(
    device: torch.device, n: int, scheme: str, old: _Workspace | None, tickets: int
) -> _Workspace:
    cap = _pow2_at_least(max(n, 4096))
    if scheme == "reduce":
        # the tickets are zero between calls, so graphs captured with the old buffers can share them
        if old is not None and old.counter.numel() >= tickets:
            counter = old.counter
        else:
            counter = torch.zeros(_pow2_at_least(max(tickets, 256)), dtype=torch.int32, device=device)
        return _Workspace(torch.zeros(cap, dtype=torch.float32, device=device), counter, cap)
    if scheme == "bits":  # bit-serial calls: t and bit planes, rewritten whole by every call
        return _Workspace(torch.zeros(cap, dtype=torch.float32, device=device), torch.zeros(1), cap)
    # "two": the counter is zero between calls, so graphs captured with the old buffer can share it
    counter = old.counter if old is not None else torch.zeros(1, dtype=torch.int32, device=device)
    return _Workspace(torch.zeros(cap, dtype=torch.float32, device=device), counter, cap)


def _workspace(device: torch.device, n: int, scheme: str = "two", tickets: int = 1) -> _Workspace:
    """A workspace of at least ``n`` floats per call for the current stream.

    Calls captured into CUDA graphs share one workspace per device (key None): which stream a graph
    will be replayed on is not known at capture, and graphs are replayed one after the other in
    practice (two graphs replayed concurrently on different streams would race on it). Calls outside
    capture grow that workspace as well, so a capture that follows a warm-up of the same calls outside
    capture (benchmarks/layer_kernels.py, benchmarks/decode.py) allocates nothing. Growing inside a capture
    still works: the zero fill becomes part of that graph.
    """
    if device.type != "cuda":
        keys = [(device, 0, scheme)]
    elif torch.cuda.is_current_stream_capturing():
        keys = [(device, None, scheme)]
    else:
        keys = [(device, torch.cuda.current_stream(device).cuda_stream, scheme), (device, None, scheme)]
    for key in keys:
        ws = _WORKSPACES.get(key)
        if ws is None or ws.cap < n or ws.counter.numel() < tickets:
            if ws is not None:
                _RETIRED.extend([ws.t, ws.counter])
            _WORKSPACES[key] = _new_workspace(device, max(n, ws.cap if ws else 0), scheme, ws, tickets)
    return _WORKSPACES[keys[0]]


@contextlib.contextmanager
def _zeroed_on_error(ws: _Workspace) -> Iterator[None]:
    """Keep the workspace zero if a launch fails after stage 1 went out (stage 2 will not clear it)."""
    try:
        yield
    except BaseException:
        # Ordered after stage 1 on the stream; during a capture it goes into the graph after stage 1.
        # A broken capture may refuse it: the original error is the one to report.
        with contextlib.suppress(Exception):
            ws.t.zero_()
            ws.counter.zero_()
        raise
