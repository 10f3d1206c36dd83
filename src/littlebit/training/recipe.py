"""One token budget for a whole run, split by the recipe, and the plan printed before the slow part.

``plan_budget(config, tokens)`` returns the config with calibration, block stage and global
distillation sized to spend ``tokens`` together: a 32 % share to the block stage (4 epochs over
its sequences), up to 16 calibration sequences, the rest global steps. At 1,638,400 tokens and
sequence length 512 this is exactly ``TrainConfig()``: 16 calibration sequences, 256 block
sequences x 4 epochs, 1,080 global steps of 2 x 512.

The time estimate uses throughputs measured on the default model (``RATES``); a model of another
size scales them by its parameter count. It is a guide to the order of magnitude, not a promise.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from littlebit.config import LittleBitError
from littlebit.training.config import TrainConfig

# Training's layer layout follows the budget. From this many tokens: one path of about twice the rank
# instead of the residual pair, and the attention projections at ATTENTION_BPW_FACTOR times the target
# BPW, the other layers lower at the same mean (``LittleBitConfig.attention_bpw_factor``).
# One path: after 1.6M tokens on an H100 it won on the held-out scores at 0.55 BPW (WikiText-2 96.5
# against 109.8, PTB 259 against 341, PIQA 0.543 against 0.540; benchmarks/results/qat_paths_gpu.json)
# and at 1.0 BPW (66.3 / 142.0 / 0.549, headline 2.44, against two runs of the pair, 2.47 and 2.50;
# qat_1bpw_gpu.json), and on WikiText-2 at 0.3 (qat.json). On two CPU cores the pair won at 40,960
# tokens (0.55 BPW, headline 15.56 against 17.08; qat_path_cpu.json) and at 30,000 (1.0 BPW,
# WikiText-2 391 against 524 over 8 windows, in 6.8 against 10.3 minutes; train_budget.json).
# Attention at 1.5x (one path, 1.6M tokens, H100; qat_attention_bits_gpu.json): 1.0 BPW 65.8 / 129.3 /
# 0.559, headline 2.35, against 66.3 / 142.0 / 0.549, 2.44; 0.55 BPW 93.4 / 224 / 0.541, 3.20, against
# 96.5 / 259 / 0.543, 3.40; also on a second data order at 1.0 BPW (2.42 against 2.55) and at 0.3 BPW
# (4.75 against 5.34); 2x lost to 1.5x at 1.0 and 0.55 BPW (2.48, 3.23; qat_layout_gpu.json).
# After 40,960 CPU tokens (the pair) it lost: headline 7.95 against 7.66
# (qat_attention_bits_cpu.json). Between those budgets nothing is measured: the switch sits at 0.4M.
LARGE_BUDGET_TOKENS = 409_600
ATTENTION_BPW_FACTOR = 1.5
# The block stage's share of a budget (524,288 of 1,638,400 tokens). At 1.6M tokens and 1.0 BPW (H100,
# qat_ablations_gpu.json) none scored headline 2.60 and half the budget 2.70 against this share's 2.35.
BLOCK_SHARE = 0.32
MAX_CALIB_SEQUENCES = 16
MIN_CALIB_SEQUENCES = 2
# One calibration sequence per this many budget tokens (1.6M tokens: 16).
CALIB_TOKENS_PER_SEQUENCE = 102_400
DEFAULT_PARAMETERS = 134_515_008  # SmolLM2-135M, the model the rates were measured on


def default_layout(tokens: int) -> dict[str, bool | float]:
    """The layer layout (``LittleBitConfig`` fields) of a run of ``tokens`` training tokens when the
    user does not say."""
    large = tokens >= LARGE_BUDGET_TOKENS
    return {"residual": not large, "attention_bpw_factor": ATTENTION_BPW_FACTOR if large else 1.0}


def training_tokens(config: TrainConfig) -> int:
    """The tokens a run trains on: its budget, or what its stages add up to when sized by hand."""
    if config.tokens is not None:
        return config.tokens
    calib = config.calib_sequences * config.seqlen if config.uses_calibration else 0
    return calib + config.blocks.tokens(config.seqlen) + config.steps * config.tokens_per_step


@dataclass(frozen=True)
class Rates:
    """Throughputs of the default model; ``init_s`` is the initialisation of the whole student."""

    where: str
    init_s: dict[str, float]  # by init method
    block_tokens_per_s: float
    global_tokens_per_s: float
    generate_tokens_per_s: float
    # The teacher's forward and backward passes over the calibration tokens (``--grad-power``)
    grad_tokens_per_s: float


# GPU: the 1.6M-token default runs on an H100 with compiled, recorded steps and checkpoints every 5
# minutes (benchmarks/results/qat_bf16_text_h100.json): setup 45.5 / 30.5 s at 1.0 / 0.55 BPW with
# refitted signs and the loss-gradient pass (Joint-ITQ alone: 29 s, qat_data_gpu.json), block stage
# 41.1 / 37.5 s for 524k tokens (compilation included), global phase 49.9 / 41.8 s for 1.1M (its
# evaluations included); generation with littlebit's decoding loop, the teacher sampling in bf16,
# 512 x 512 a shard: 25,050 tokens/s over the 8.9M tokens of a 16M run's text
# (benchmarks/results/generate_pipeline_bf16_h100.txt).
# CPU: 2 cores; global steps at 150 tokens/s from `benchmarks/train_budget.py --tokens 30000`
# (benchmarks/results/train_budget.json); calibration and initialisation 15 / 91 / 123 s for
# Dual-SVID / Joint-ITQ / refitted signs (benchmarks/results/qat_init_cpu.json, setup); generation
# at 84 tokens/s, 32 sequences a shard, chat starts included (benchmarks/results/generate_rate_cpu.json,
# on a machine about 1.5x slower than the one of the other CPU rates). The loss-gradient
# pass of --grad-power: on the CPU 8-34 s (~21 s) more initialisation for 8,192 calibration tokens
# (benchmarks/results/init_quality_grad_cpu.json, powers 0.5 and 1 against 0); not timed apart on a
# GPU, where the global step's rate, which also runs the student, bounds it.
RATES = {
    "cuda": Rates(
        "an H100", {"itq": 30.0, "itq-refined": 45.0, "dual-svid": 15.0}, 12500.0, 22000.0, 25000.0, 12000.0
    ),
    "cpu": Rates(
        "2 idle CPU cores", {"itq": 90.0, "itq-refined": 125.0, "dual-svid": 15.0}, 150.0, 150.0, 84.0, 380.0
    ),
}


def plan_budget(config: TrainConfig, tokens: int, block_share: float = BLOCK_SHARE) -> TrainConfig:
    """``config`` with its calibration, block stage and global steps sized to spend ``tokens``."""
    if not 0.0 <= block_share < 1.0:
        raise LittleBitError(f"the block stage's share must be in [0, 1), got {block_share}")
    seqlen, blocks = config.seqlen, config.blocks
    per_step = config.tokens_per_step
    calib = min(MAX_CALIB_SEQUENCES, max(MIN_CALIB_SEQUENCES, tokens // CALIB_TOKENS_PER_SEQUENCE))
    calib_tokens = calib * seqlen if config.uses_calibration else 0
    epochs = blocks.epochs or 4
    block_seqs = round(tokens * block_share) // (epochs * seqlen)
    if block_seqs < blocks.batch_size:
        block_seqs = 0  # too small a share for one block-stage batch: all of it goes to global steps
    steps = (tokens - calib_tokens - block_seqs * epochs * seqlen) // per_step
    if steps < 1:
        least = calib_tokens + per_step
        raise LittleBitError(f"a budget of {tokens} tokens is too small: it needs at least {least}")
    new_blocks = dataclasses.replace(blocks, sequences=block_seqs, epochs=epochs)
    return dataclasses.replace(config, calib_sequences=calib, blocks=new_blocks, steps=steps, tokens=tokens)


@dataclass
class Stage:
    name: str
    tokens: int
    seconds: float


def stages(
    config: TrainConfig, init: str, generated_tokens: int, device: str, parameters: int = DEFAULT_PARAMETERS
) -> list[Stage]:
    """What the run will do, in order, with its tokens and estimated seconds."""
    rates = RATES["cuda" if device == "cuda" else "cpu"]
    size = parameters / DEFAULT_PARAMETERS
    calib = config.calib_sequences * config.seqlen if config.uses_calibration else 0
    block = config.blocks.tokens(config.seqlen) if config.blocks.sequences else 0
    glob = config.steps * config.tokens_per_step
    out = []
    if generated_tokens:
        out.append(
            Stage("generate text", generated_tokens, generated_tokens * size / rates.generate_tokens_per_s)
        )
    init_s = rates.init_s.get(init, rates.init_s["itq"]) * size
    if config.grad_power and calib:
        init_s += calib * size / rates.grad_tokens_per_s
    out.append(Stage(f"calibrate + {init} init", calib, init_s))
    if block:
        out.append(Stage("block reconstruction", block, block * size / rates.block_tokens_per_s))
    out.append(Stage("global distillation", glob, glob * size / rates.global_tokens_per_s))
    return out


def describe(plan: list[Stage], device: str) -> str:
    """The plan as a few lines for the terminal."""
    rates = RATES["cuda" if device == "cuda" else "cpu"]
    lines = ["plan:"]
    for s in plan:
        lines.append(f"  {s.name:<28} {s.tokens:>11,} tokens  ~{_duration(s.seconds)}")
    trained = sum(s.tokens for s in plan if s.name != "generate text")
    total = sum(s.seconds for s in plan)
    lines.append(f"  {'total':<28} {trained:>11,} tokens  ~{_duration(total)} (rates of {rates.where})")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
