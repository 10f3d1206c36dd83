"""The prefill kernels' main loops stay pipelined on Hopper, checked without a GPU: compiled for sm_90
by Triton's own toolchain and read as ``benchmarks/dev/kernel_pipelining.py`` reads them. The GPU timings
do not show a loop that quietly lost its pipelining until someone measures; this does, at every change.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
    pytest.skip("the loops were read with Triton 3.6 and 3.9", allow_module_level=True)

BENCHMARKS_DEV = Path(__file__).resolve().parents[1] / "benchmarks" / "dev"


@pytest.fixture(scope="module")
def analysis():
    sys.path.insert(0, str(BENCHMARKS_DEV))
    try:
        kp = importlib.import_module("kernel_pipelining")
    finally:
        sys.path.remove(str(BENCHMARKS_DEV))
    from littlebit.kernels.gpu import _tensorcore, prefill

    def compile_case(name: str, constexprs: dict, warps: int) -> tuple[list[dict], dict]:
        module = prefill if name.startswith("_pf_") else _tensorcore
        read = kp.analyse(getattr(module, name), constexprs, warps)
        return read["loops"], read["sass_loop"]

    return compile_case


PIPELINED = [  # (kernel, constexprs, warps)
    ("_pf_v_kernel", {"BR": 64, "BM": 64}, 4),
    ("_pf_v_kernel", {"BR": 128, "BM": 128}, 8),
    ("_pf_u_kernel", {"BO": 128, "BM": 64}, 4),
]


@pytest.mark.parametrize(("name", "constexprs", "warps"), PIPELINED, ids=["s1-64", "s1-128", "s2"])
def test_prefill_loops_copy_asynchronously_and_keep_mmas_in_flight(analysis, name, constexprs, warps):
    loops, _ = analysis(name, constexprs, warps)
    assert loops, "no loop with an MMA"
    for loop in loops:
        assert loop["async_copies"] >= 2 and loop["sync_loads"] == 0, loop
        assert loop["register_tiles_to_shared"] == 0, loop
        assert loop["mma_waits"] and min(loop["mma_waits"]) >= 1, loop


def test_an_unpipelined_loop_is_told_apart(analysis):
    """The same reading on the 2-64-token stage 1, which forms g * x in its loop, finds what the
    prefill loops avoid."""
    loops, _ = analysis("_tc_v_kernel", {"BR": 64, "BM": 16, "t": "*fp32"}, 4)
    assert any(loop["register_tiles_to_shared"] >= 1 and 0 in loop["mma_waits"] for loop in loops), loops


def test_the_pipelined_stage_1_issues_few_instructions_a_step(analysis):
    """A step of 64 entries: 127 instructions a thread with Triton 3.6 and 132 with 3.9, with a pair of
    signs decoded by one shift and one LOP3 (``_tensorcore.sign_ones``; the 1.0 bits as a literal take
    a second LOP3 a pair), 276-280 with g * x formed in the loop. A new Triton may move these: read the
    loop again (``python benchmarks/dev/kernel_pipelining.py``) before moving the bound."""
    _, step = analysis("_pf_v_kernel", {"BR": 128, "BM": 128}, 8)
    assert step["by_opcode"].get("HGMMA", 0) >= 1 and step["instructions"] <= 138, step
