"""How long the block stage takes a layer, its layers eager or compiled, each step recorded as a CUDA graph.

The block stage trains one decoder layer at a time (``training.blockwise``). Its cost does not depend on
the weights, so this builds a model of the default model's shape (SmolLM2-135M: 576 wide, MLP 1536, 9
query and 3 key/value heads, vocabulary 49,152) with random weights, no download and no staging, and a
student of the default layout (1.0 BPW, one path, attention at 1.5x; Dual-SVID, whose start does not
change a step's cost). It runs the stage twice in one process, the layers as they are, then each layer
``torch.compile``d before it trains, and records when each layer finishes. The first compiled layer
includes the compilation, so the per-layer medians leave the first layer out. On a CPU it is a dry run
of the script. Writes ``benchmarks/results/block_stage_speed.json``.

    python benchmarks/dev/block_stage_speed.py --layers 6 --sequences 64
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402, F401  (puts src on the path)
import torch  # noqa: E402

from littlebit.config import LittleBitConfig  # noqa: E402
from littlebit.training.blockwise import reconstruct_blocks  # noqa: E402
from littlebit.training.config import BlockConfig, LearningRates  # noqa: E402
from littlebit.training.student import make_student  # noqa: E402


def default_shape(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def run_stage(teacher, student, sequences, blocks: BlockConfig, compiled: bool) -> list[float]:
    """Seconds each layer took (from the previous layer's end; the first from the stage's start)."""
    cuda = next(student.parameters()).is_cuda
    marks = [time.perf_counter()]

    def done(index: int, loss: float) -> None:
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    device = next(student.parameters()).device.type
    amp = lambda: torch.autocast(device, dtype=torch.bfloat16)  # noqa: E731
    reconstruct_blocks(
        teacher, student, sequences, blocks, LearningRates(), amp, on_block_done=done, progress=False,
        cuda_graphs=cuda, compiled=compiled,
    )  # fmt: skip
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--sequences", type=int, default=64, help="block sequences of 512 tokens")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results/block_stage_speed.json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a dry run of the script only
    teacher = default_shape(args.layers).to(device)
    lb = LittleBitConfig(bpw=1.0, residual=False, attention_bpw_factor=1.5)
    gen = torch.Generator().manual_seed(1)
    sequences = torch.randint(0, 49152, (args.sequences, args.seqlen), generator=gen)
    blocks = BlockConfig(sequences=args.sequences, epochs=args.epochs, batch_size=2)
    steps = args.sequences * args.epochs // blocks.batch_size
    result = {"layers": args.layers, "steps_per_layer": steps, "batch": f"2x{args.seqlen}", "bpw": 1.0}
    for name, compiled in (("eager", False), ("compiled", True)):
        student = make_student(teacher, lb, progress=False).to(device)
        seconds = run_stage(teacher, student, sequences, blocks, compiled)
        later = statistics.median(seconds[1:])
        result[name] = {
            "seconds_per_layer": [round(s, 3) for s in seconds],
            "median_s_per_layer_after_first": round(later, 3),
            "ms_per_step_after_first": round(later / steps * 1e3, 3),
        }
        per_step = later / steps * 1e3
        print(f"{name:9s} first layer {seconds[0]:.2f} s, then {later:.3f} s/layer ({per_step:.2f} ms/step)")
        del student
    key = "median_s_per_layer_after_first"
    result["speedup_after_first"] = round(result["eager"][key] / result["compiled"][key], 3)
    result.update(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__,
        date=datetime.date.today().isoformat(),
        command="python benchmarks/dev/block_stage_speed.py " + " ".join(sys.argv[1:]),
    )  # fmt: skip
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
