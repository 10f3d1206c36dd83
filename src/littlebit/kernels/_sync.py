"""Ordering between programs and launches: programmatic dependent launch for the two-launch kernels,
and the grid-wide order of the single-launch kernels (stage 1 and stage 2 of a call in one grid).

Programmatic dependent launch (sm_90+, ``launch_pdl``): a kernel launched with it may start while the
previous kernel on the stream still runs, so each GEMV stage first loads what no earlier kernel writes
(its first words of signs), then waits for the previous grid (``_pdl_wait``: its writes are then
visible). Each program signals (``_pdl_launch_next``) once its main loop is done, so the next launch is
scheduled during the previous grid's tail. Signalling at the start instead was slower (4096x4096
10.6 against 8.5 µs without PDL, batch 16 62 against 51): the waiting programs of the next grid sat
on the SMs for the whole stage. Every PDL kernel waits before it reads or writes anything shared, so
a completed grid implies its predecessors completed too.

Single launch:

No program assumes that any other is resident at the same time (no co-residency, so no deadlock
whatever the grid size): every program first takes a *ticket* (an atomic counter); tickets below
``n1`` do stage-1 work, indexed by the ticket and not by ``program_id``, and then count themselves
done with release semantics; higher tickets wait (spin) until that count reaches ``n1`` and then do
stage-2 work. A program only ever waits on programs that took earlier tickets, and those are running
(a ticket is taken by a running program) and never wait, so every wait ends. In Triton's interpreter
programs run one after another in ticket order, so the stage-1 tickets all finish before the first
stage-2 ticket looks at the count.

``t`` is double-buffered: between calls, half ``parity`` is all zero and the other half holds the
previous call's sums over its first ``dirty`` floats. A call adds into the clean half while its
stage-2 programs clear a slice each of the dirty half (before they wait, so that overlaps stage 1);
the last program to finish flips ``parity``, records its own used length as ``dirty`` and resets the
counters. No program ever clears alone at the end, and replays of a captured CUDA graph follow the
parity on the device, however many calls the graph holds.

State words (int32): ticket, stage-1 done, finished, parity, dirty.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = True
except ImportError:  # Triton before 3.4: PDL stays off, these are never reached
    HAS_PDL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    if PDL:
        gdc_wait()


@triton.jit
def _pdl_launch_next(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()


N_STATE = 8  # words allocated for the state (5 used)


@triton.jit
def _begin(state_ptr, t_ptr, cap):
    """(ticket, parity, this call's half of t, the other half)."""
    ticket = tl.atomic_add(state_ptr, 1, sem="relaxed")
    parity = tl.load(state_ptr + 3, volatile=True)
    return ticket, parity, t_ptr + parity * cap, t_ptr + (1 - parity) * cap


@triton.jit
def _stage1_done(state_ptr):
    # every warp's atomics into t come before the release (CTA barrier, then a gpu-scope release)
    tl.debug_barrier()
    tl.atomic_add(state_ptr + 1, 1, sem="release")


@triton.jit
def _clear_slice(buf_ptr, state_ptr, part, n_parts, ZB: tl.constexpr):
    """Zero slice ``part`` of ``n_parts`` of the first ``dirty`` floats of ``buf_ptr``."""
    dirty = tl.load(state_ptr + 4, volatile=True)
    per = tl.cdiv(tl.cdiv(dirty, n_parts), 32) * 32
    lo = part * per
    hi = tl.minimum(lo + per, dirty)
    for z0 in range(lo, hi, ZB):
        z = z0 + tl.arange(0, ZB)
        tl.store(buf_ptr + z, tl.zeros((ZB,), tl.float32), mask=z < hi)


@triton.jit
def _nap(x, NS: tl.constexpr):
    """``x``, after sleeping about ``NS`` ns (nanosleep; 0: no sleep, as under the interpreter)."""
    if NS > 0:
        res = tl.inline_asm_elementwise(
            f"nanosleep.u32 {NS}; mov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1
        )
    else:
        res = x
    return res


@triton.jit
def _wait_stage1(state_ptr, n1, NS: tl.constexpr):
    """Spin until all ``n1`` stage-1 tickets are done; acquire their writes.

    Waiting programs share SMs with stage-1 programs, whose decoding is bound by instruction issue:
    each poll sleeps ``NS`` ns so that the waiting warps hardly issue.
    """
    seen = tl.atomic_add(state_ptr + 1, 0, sem="acquire")  # compiles to an acquire load
    while seen < n1:
        # poll with plain (volatile, L2) loads, then acquire once the count is reached
        probe = _nap(tl.load(state_ptr + 1, volatile=True), NS)
        while probe < n1:
            probe = _nap(tl.load(state_ptr + 1, volatile=True), NS)
        seen = tl.atomic_add(state_ptr + 1, 0, sem="acquire")
    # every warp of this program reads t only after the acquire above
    tl.debug_barrier()


@triton.jit
def _finish(state_ptr, n2, parity, n_used):
    """Called by every stage-2 program once it has read t and cleared its slice: the last one
    hands the state to the next call."""
    tl.debug_barrier()
    done = tl.atomic_add(state_ptr + 2, 1, sem="acq_rel")
    if done == n2 - 1:
        tl.store(state_ptr + 4, n_used)
        tl.store(state_ptr + 3, 1 - parity)
        tl.store(state_ptr + 1, 0)
        tl.store(state_ptr + 2, 0)
        tl.store(state_ptr, 0)


@triton.jit
def _enter_stage2(t_old, state_ptr, part, n2, n1, ZB: tl.constexpr, NS: tl.constexpr):
    """A stage-2 program's start: clear its slice of the previous call's half, then wait for stage 1."""
    _clear_slice(t_old, state_ptr, part, n2, ZB)
    _wait_stage1(state_ptr, n1, NS)
