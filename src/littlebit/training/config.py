"""What a training run does, as versioned JSON-ready dataclasses (no torch: the command line builds
them, and their checks run, before anything heavy is imported)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from littlebit.config import LittleBitError

BLOCK_INPUTS = ("student", "teacher")
START_KINDS = ("bos", "random", "chat")
SAMPLING_DTYPES = ("float32", "bfloat16", "float16")
LOSS_FORMS = ("normalized", "paper")
_DEFAULT_HIDDEN_WEIGHT = {"normalized": 1.0, "paper": 10.0}


@dataclass
class LearningRates:
    # 6e-5: with the small steps of the default recipe (global batch 2) it beat
    # 1e-4 at 1.0 BPW (WikiText-2 65.8 / 66.0 over two data orders against 67.1) and matched it at 0.55
    # and 0.3 BPW (104.2 / 174.8 against 105.3 / 174.9); 4e-5 and 2.5e-5 were worse (BENCHMARKS.md).
    latent: float = 6e-5
    scale: float = 2e-3  # relative to each tensor's RMS
    norm: float = 2e-3  # relative to each tensor's RMS
    relative: bool = True

    def __post_init__(self) -> None:
        for name, flag in (("latent", "latent-lr"), ("scale", "lr"), ("norm", "norm-lr")):
            value = getattr(self, name)
            # Written to also refuse NaN, which compares false with everything.
            if not (value > 0 and math.isfinite(value)):
                raise LittleBitError(f"{flag} must be a finite number > 0, got {value}")


@dataclass
class DistillConfig:
    form: str = "normalized"
    hidden_weight: float | None = None  # None: 1.0 for "normalized", 10.0 for "paper"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.form not in LOSS_FORMS:
            raise LittleBitError(f"loss must be one of {LOSS_FORMS}, got {self.form!r}")
        # Written to also refuse NaN, which compares false with everything.
        weight = self.hidden_weight
        if weight is not None and not (weight >= 0 and math.isfinite(weight)):
            raise LittleBitError(f"hidden-state weight must be a finite number >= 0, got {weight}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise LittleBitError(f"temperature must be a finite number > 0, got {self.temperature}")

    @property
    def weight(self) -> float:
        return _DEFAULT_HIDDEN_WEIGHT[self.form] if self.hidden_weight is None else self.hidden_weight


@dataclass
class BlockConfig:
    # 256 sequences x 4 epochs (524k token-passes at seqlen 512, a third of a 1.6M-token budget) in
    # batches of 2: on the default model at 1.0 BPW more block sequences (128 -> 256) and smaller
    # block batches (4 -> 2) each lowered WikiText-2 perplexity by ~3 %, though they leave fewer
    # global steps (BENCHMARKS.md). Same tokens, more and smaller steps.
    sequences: int = 256
    epochs: int = 4
    batch_size: int = 2
    inputs: str = "student"
    warmup_frac: float = 0.05
    # Each layer gets only epochs x sequences / batch_size steps (512 by default, against 1080 global
    # ones), so it takes larger ones. (x5 was tuned with 32 steps per layer; not re-tuned since.)
    lr_multiplier: float = 5.0

    def __post_init__(self) -> None:
        if self.inputs not in BLOCK_INPUTS:
            raise LittleBitError(f"block inputs must be one of {BLOCK_INPUTS}, got {self.inputs!r}")
        if self.sequences < 0 or self.epochs < 0 or self.batch_size < 1:
            raise LittleBitError("block reconstruction needs sequences >= 0, epochs >= 0, batch size >= 1")

    def tokens(self, seqlen: int) -> int:
        return self.sequences * seqlen * self.epochs


@dataclass
class TextGenConfig:
    """How the teacher writes its own training text (LLM-QAT, arXiv 2305.17888).

    Every field here shapes the text, so all of them key the on-disk cache. Shard ``k`` is one batched
    sampling call of ``batch_size`` sequences with start ``starts[k % len(starts)]``, seeded by
    ``(seed, k)``: asking for more tokens later appends shards and leaves the earlier ones as they were.
    """

    temperature: float = 1.0
    top_p: float = 0.95
    length: int = 512  # tokens per sequence, start included (the training sequence length)
    # Sequences per shard; None: on a GPU as many as the model's static cache allows, on a CPU 32.
    batch_size: int | None = None
    # BOS alone, BOS and one random token, or the chat template up to the user's words (instruct
    # models then write the question and the answer); kinds the tokenizer cannot make are skipped.
    starts: list[str] = field(default_factory=lambda: list(START_KINDS))
    seed: int = 0
    # The teacher's dtype while it samples; None: on a GPU bfloat16 for an fp32 teacher (a bf16 copy of
    # the default model, twice the batch: 2.8x the tokens/s on an H100, BENCHMARKS.md) and a 16-bit
    # teacher's own; on a CPU the model's own.
    dtype: str | None = None

    def __post_init__(self) -> None:
        self.starts = list(self.starts)
        if self.dtype is not None and self.dtype not in SAMPLING_DTYPES:
            raise LittleBitError(f"sampling dtype must be one of {', '.join(SAMPLING_DTYPES)}: {self.dtype}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise LittleBitError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise LittleBitError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.length < 8:
            raise LittleBitError(f"generated sequences need length >= 8, got {self.length}")
        if self.batch_size is not None and self.batch_size < 1:
            raise LittleBitError(f"generation batch size must be >= 1, got {self.batch_size}")
        bad = [k for k in self.starts if k not in START_KINDS]
        if bad or not self.starts:
            raise LittleBitError(
                f"starts must be some of {', '.join(START_KINDS)}, got {','.join(self.starts)}"
            )


@dataclass
class TrainConfig:
    # 1080 steps of 2 x 512 tokens fill a 1.6M-token budget after calibration and the block stage.
    # For a fixed number of tokens, more and smaller steps trained better: at 1.0 BPW batch 8 -> 4 -> 2
    # gave WikiText-2 77.7 -> 72.9 -> 70.7 (BENCHMARKS.md). Throughput is quoted at batch 8.
    steps: int = 1080
    seqlen: int = 512
    batch_size: int = 2  # sequences per micro-batch; one optimizer step sees grad_accum of them
    grad_accum: int = 1
    lrs: LearningRates = field(default_factory=LearningRates)
    warmup_frac: float = 0.02
    loss: DistillConfig = field(default_factory=DistillConfig)
    blocks: BlockConfig = field(default_factory=BlockConfig)
    calib_sequences: int = 16
    act_power: float = 1.0
    # Output rows weighted at initialisation by the teacher's loss-gradient RMS to this power (0: off).
    grad_power: float = 0.0
    latent_rms: float | None = 0.02
    train_norms: bool = True
    # Global-norm gradient clipping in the global phase: with steps of 2 sequences the gradient is
    # noisy; at 1.0 BPW clipping at 1 took WikiText-2 from 65.8 to 64.8 (BENCHMARKS.md). None: off.
    max_grad_norm: float | None = 1.0
    seed: int = 0
    # Unique training tokens drawn from sources that can give any amount (generated text); None: as
    # many as the run reads, so no generated sequence is seen twice.
    data_tokens: int | None = None
    generation: TextGenConfig = field(default_factory=TextGenConfig)
    # The whole run's token budget when the recipe split it (recipe.plan_budget); for the record only.
    tokens: int | None = None
    eval_every: int = 0
    eval_windows: int | None = 8
    eval_seqlen: int = 512
    # Checkpoints: every ``save_every`` global steps (0: not by steps; any value also saves after every
    # block-stage layer) and whenever ``save_interval_s`` seconds have passed since the last one (0: not by
    # time). A global-phase checkpoint of the default model at 1.0 BPW is 1.2 GB and took 3.95 s to write
    # on a CPU (benchmarks/results/checkpoint_cost_cpu.json), while 50 compiled global steps take about
    # 1.2 s on an H100: saving by time keeps the cost a small share on any device.
    save_every: int = 0
    save_interval_s: float = 300.0
    keep_checkpoints: int = 2  # the newest N stay on disk (0: all), so a damaged one has a fallback
    compile: bool | None = None  # None: on CUDA
    cuda_graphs: bool | None = None  # replay global and block micro-steps as CUDA graphs; None: on CUDA
    amp: bool | None = None  # bf16 autocast; None: on CUDA only
    grad_checkpoint: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        # Comparisons are written so that NaN, which compares false with everything, fails them.
        if not 0.0 <= self.warmup_frac < 1.0:
            raise LittleBitError(f"warmup must be a fraction in [0, 1), got {self.warmup_frac}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            norm = self.max_grad_norm
            raise LittleBitError(f"max-grad-norm must be > 0 (0 on the command line: off), got {norm}")
        if self.latent_rms is not None and not (self.latent_rms > 0 and math.isfinite(self.latent_rms)):
            rms = self.latent_rms
            raise LittleBitError(f"latent-rms must be > 0 (0 on the command line: keep), got {rms}")
        if not (self.act_power >= 0 and math.isfinite(self.act_power)):
            raise LittleBitError(f"act-power must be >= 0, got {self.act_power}")
        if not (self.grad_power >= 0 and math.isfinite(self.grad_power)):
            raise LittleBitError(f"grad-power must be >= 0, got {self.grad_power}")
        if not (self.save_interval_s >= 0 and math.isfinite(self.save_interval_s)):
            raise LittleBitError(f"save-interval must be >= 0 seconds (0: off), got {self.save_interval_s}")
        if self.eval_windows is not None and self.eval_windows < 1:
            windows = self.eval_windows
            raise LittleBitError(f"eval-windows must be >= 1 (None: the whole split), got {windows}")
        minimum = {"steps": 0, "seqlen": 2, "batch_size": 1, "grad_accum": 1, "calib_sequences": 0}
        minimum.update(eval_every=0, eval_seqlen=2, save_every=0, keep_checkpoints=0)
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise LittleBitError(f"{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if isinstance(self.lrs, dict):
            self.lrs = LearningRates(**self.lrs)
        if isinstance(self.loss, dict):
            self.loss = DistillConfig(**self.loss)
        if isinstance(self.blocks, dict):
            self.blocks = BlockConfig(**self.blocks)
        if isinstance(self.generation, dict):
            self.generation = TextGenConfig(**self.generation)
        if self.data_tokens is not None and self.data_tokens < 1:
            raise LittleBitError(f"data-tokens must be >= 1, got {self.data_tokens}")

    @property
    def uses_calibration(self) -> bool:
        """Whether the initialisation reads calibration sequences (weighted by their statistics)."""
        return self.act_power != 0 or self.grad_power != 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seqlen

    def sequences_read(self) -> int:
        """Distinct sequences the run reads: calibration, the block stage's, one per global sample."""
        calib = self.calib_sequences  # the block stage starts after the calibration slice either way
        blocks = self.blocks.sequences if self.blocks.epochs else 0
        return calib + blocks + self.steps * self.batch_size * self.grad_accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
