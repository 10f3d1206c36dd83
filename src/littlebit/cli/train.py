"""``littlebit train``: distil a LittleBit model from the original one and save it packed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from littlebit.atomic import check_output_dir, check_writable_dir
from littlebit.cli.common import (
    add_compression_arguments,
    check_context,
    compression_config,
    device_name,
    threads_type,
)
from littlebit.config import SIGN_FUNCTIONS, LittleBitConfig, LittleBitError
from littlebit.evaluation.data import check_test_set
from littlebit.training.config import (
    BLOCK_INPUTS,
    LOSS_FORMS,
    SAMPLING_DTYPES,
    START_KINDS,
    BlockConfig,
    DistillConfig,
    LearningRates,
    TextGenConfig,
    TrainConfig,
)
from littlebit.training.data_spec import (
    DEFAULT_MIXTURE,
    DEFAULT_WITH_LOCAL_CORPUS,
    GENERATED,
    MIXTURE_FROM_TOKENS,
    parse_data_spec,
)
from littlebit.training.recipe import (
    ATTENTION_BPW_FACTOR,
    LARGE_BUDGET_TOKENS,
    default_layout,
    plan_budget,
    training_tokens,
)

# The budget the defaults spend (calibration, block stage and 1,080 global steps of 2 x 512).
DEFAULT_TOKENS = 1_638_400

log = logging.getLogger(__name__)

# The initialisation: Joint-ITQ with its signs refitted to the weight, rows weighted by the teacher's
# loss gradient to this power. At 1.6M tokens on a GPU (default data, 1.0 BPW) it took WikiText-2 / PTB
# from 74.1 / 177.9 with plain Joint-ITQ to 67.1 / 146.0 (benchmarks/results/qat_recipe_gpu.json); after
# 40k tokens on a CPU the held-out headline went from 13.0 (Joint-ITQ) to 9.7 with refitted signs
# and 7.7 with the weighting (qat_init_cpu.json, qat_grad_cpu.json).
DEFAULT_INIT = "itq-refined"
DEFAULT_GRAD_POWER = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    large = f"from {LARGE_BUDGET_TOKENS:,} training tokens"
    add_compression_arguments(
        parser,
        init_default=DEFAULT_INIT,
        paths_default=f"one {large}, two below",
        attention_default=f"{ATTENTION_BPW_FACTOR:g} {large}, 1 below",
    )
    _budget_arguments(parser.add_argument_group("budget and resuming"))
    _text_arguments(parser.add_argument_group("training text"))
    _distillation_arguments(parser.add_argument_group("distillation"), defaults)
    _init_arguments(parser.add_argument_group("initialisation"))
    _evaluation_arguments(parser.add_argument_group("evaluation and checkpoints"), defaults)
    _runtime_arguments(parser.add_argument_group("how it runs"))


def _budget_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--tokens",
        type=int,
        default=None,
        help=f"training tokens for the whole run, split by the recipe into calibration, block stage "
        f"and global distillation (default: {DEFAULT_TOKENS:,}; not with --steps, --block-sequences "
        "or --calib-sequences)",
    )
    group.add_argument("--work-dir", default=None, help="checkpoints and logs (default: OUT-train)")
    group.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in the work dir"
    )
    group.add_argument(
        "--resume-from", default=None, metavar="PATH", help="continue from this checkpoint (a state-*.json)"
    )


def _text_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--data",
        default=None,
        help=f"SOURCE[:WEIGHT],...: {GENERATED} (text the teacher writes), wikitext2:valid, a text file or "
        f"a folder (default where a local WikiText-2 is: {DEFAULT_WITH_LOCAL_CORPUS} up to "
        f"{MIXTURE_FROM_TOKENS:,} tokens, else {DEFAULT_MIXTURE}; without one: {GENERATED})",
    )
    group.add_argument(
        "--data-tokens",
        type=int,
        default=None,
        help="unique training tokens to assemble from the sources (default: as many as the run reads)",
    )
    group.add_argument(
        "--generated-dir",
        default=None,
        help="cache of generated text (default: ~/.cache/littlebit/generated)",
    )
    gen = TextGenConfig()
    group.add_argument("--gen-temperature", type=float, default=gen.temperature, help="sampling temperature")
    group.add_argument("--gen-top-p", type=float, default=gen.top_p, help="nucleus sampling threshold")
    group.add_argument(
        "--gen-batch-size",
        type=int,
        default=None,
        help="sequences per generated shard (GPU: as many as 16 GiB of cache holds; CPU: 32)",
    )
    group.add_argument(
        "--gen-dtype",
        choices=SAMPLING_DTYPES,
        default=None,
        help="the teacher's dtype as it writes text (default: GPU, bfloat16 for an fp32 model; else its own)",
    )
    group.add_argument(
        "--gen-starts",
        default=",".join(gen.starts),
        help=f"start kinds of generated sequences, some of {','.join(START_KINDS)}",
    )


def _distillation_arguments(group: argparse._ArgumentGroup, defaults: TrainConfig) -> None:
    group.add_argument(
        "--steps", type=int, default=None, help=f"global distillation steps (default: {defaults.steps})"
    )
    group.add_argument("--seqlen", type=int, default=512, help="tokens per training sequence (at least 8)")
    group.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"sequences per micro-batch (default: {defaults.batch_size})",
    )
    group.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    group.add_argument(
        "--lr", type=float, default=None, help="scale learning rate, relative to each scale's RMS"
    )
    group.add_argument("--latent-lr", type=float, default=None, help="learning rate of the latent factors")
    group.add_argument("--norm-lr", type=float, default=None, help="norm learning rate (relative)")
    group.add_argument("--freeze-norms", action="store_true", help="do not train the RMSNorm weights")
    group.add_argument("--loss", choices=LOSS_FORMS, default="normalized", help="distillation loss form")
    group.add_argument("--hidden-weight", type=float, default=None, help="weight of the hidden-state term")
    group.add_argument("--warmup", type=float, default=0.02, help="warm-up, as a fraction of the steps")
    group.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help=f"clip the global gradient norm to this (0: off; default: {defaults.max_grad_norm})",
    )
    group.add_argument(
        "--block-sequences", type=int, default=None, help="sequences for block reconstruction (0: off)"
    )
    group.add_argument("--block-epochs", type=int, default=None)
    group.add_argument("--block-batch-size", type=int, default=None, help="sequences per block-stage step")
    group.add_argument("--block-inputs", choices=BLOCK_INPUTS, default="student")


def _init_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--calib-sequences", type=int, default=None, help="sequences for activation statistics"
    )
    group.add_argument(
        "--act-power", type=float, default=None, help="activation-aware init exponent (0: off)"
    )
    group.add_argument(
        "--grad-power",
        type=float,
        default=None,
        help="weight each layer's output rows at init by the teacher's loss-gradient RMS to this power "
        f"(0: off; default: {DEFAULT_GRAD_POWER}; under torchrun 0 where the model is built shard by shard)",
    )
    group.add_argument("--latent-rms", type=float, default=None, help="rescale latents to this RMS (0: keep)")
    group.add_argument("--sign", choices=SIGN_FUNCTIONS, default="smooth", help="sign surrogate gradient")


def _evaluation_arguments(group: argparse._ArgumentGroup, defaults: TrainConfig) -> None:
    group.add_argument(
        "--eval-every", type=int, default=50, help="steps between perplexity evaluations (0: end only)"
    )
    group.add_argument("--eval-windows", type=int, default=8, help="windows per evaluation (0: whole split)")
    group.add_argument("--eval-seqlen", type=int, default=512)
    group.add_argument(
        "--eval-text",
        default="wikitext2",
        help="held-out text the evaluations score, as littlebit eval --ppl takes one: wikitext2 or ptb (test "
        "splits), a text file or folder, or hf:NAME[?config=C&split=S&column=COL] (default: wikitext2)",
    )
    group.add_argument(
        "--save-every",
        type=int,
        default=defaults.save_every,
        help="also a checkpoint every N global steps and after every block-stage layer (0: by time only)",
    )
    group.add_argument(
        "--save-interval",
        type=float,
        default=defaults.save_interval_s,
        help=f"seconds between checkpoints (0: not by time; default: {defaults.save_interval_s:g})",
    )
    group.add_argument(
        "--keep-checkpoints",
        type=int,
        default=defaults.keep_checkpoints,
        help=f"newest checkpoints kept on disk (0: all; default: {defaults.keep_checkpoints})",
    )
    group.add_argument(
        "--keep-state", action="store_true", help="keep the checkpoints once the model is written"
    )


def _runtime_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    group.add_argument(
        "--no-cuda-graphs", action="store_true", help="launch each kernel of a step from Python (GPU)"
    )
    group.add_argument("--no-amp", action="store_true", help="train in fp32 even on GPU")
    group.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in backward")
    group.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")
    group.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="train on N processes (one per GPU), sharded with FSDP2: runs this command under torchrun",
    )
    group.add_argument(
        "--offload-teacher", action="store_true", help="sharded runs: keep the teacher's shards in CPU memory"
    )
    group.add_argument(
        "--threads",
        type=threads_type,
        default=None,
        help="CPU threads (default: torch's); on a CPU shared with other work, 1 keeps a second "
        "thread from waiting at every operation's barrier for a core",
    )


def config_from_args(args: argparse.Namespace) -> tuple[LittleBitConfig, TrainConfig]:
    """The configs the arguments ask for; bad values raise ``LittleBitError`` before anything is loaded.

    Without ``--steps`` (or the block-stage and calibration sizes) the recipe splits ``--tokens``
    (default ``DEFAULT_TOKENS``) among the stages.
    """
    if args.seqlen < 8:  # the teacher's text takes the same length, and needs room after its start
        raise LittleBitError(f"--seqlen must be at least 8, got {args.seqlen}")
    # 0 means "off" or "all" for these on the command line and None in the configs: refuse the
    # negative values here, before they could be read as something else.
    for flag in ("eval_windows", "latent_rms", "max_grad_norm"):
        value = getattr(args, flag)
        if value is not None and not value >= 0:
            raise LittleBitError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    if args.data is not None:
        parse_data_spec(args.data)  # a bad spec fails here, before anything is loaded
    check_test_set(args.eval_text)
    explicit = [f for f in ("steps", "block_sequences", "calib_sequences") if getattr(args, f) is not None]
    if args.tokens is not None and explicit:
        flag = explicit[0].replace("_", "-")
        raise LittleBitError(f"--tokens sizes the stages itself: leave out --{flag}, or --tokens")
    if args.tokens is not None and args.tokens < 1:
        raise LittleBitError(f"--tokens must be >= 1, got {args.tokens}")
    d = TrainConfig()
    lrs = LearningRates(
        latent=args.latent_lr if args.latent_lr is not None else d.lrs.latent,
        scale=args.lr if args.lr is not None else d.lrs.scale,
        norm=args.norm_lr if args.norm_lr is not None else d.lrs.norm,
    )
    blocks = BlockConfig(
        sequences=d.blocks.sequences if args.block_sequences is None else args.block_sequences,
        epochs=d.blocks.epochs if args.block_epochs is None else args.block_epochs,
        batch_size=d.blocks.batch_size if args.block_batch_size is None else args.block_batch_size,
        inputs=args.block_inputs,
    )
    cfg = TrainConfig(
        steps=d.steps if args.steps is None else args.steps,
        seqlen=args.seqlen,
        batch_size=d.batch_size if args.batch_size is None else args.batch_size,
        grad_accum=args.grad_accum,
        lrs=lrs,
        warmup_frac=args.warmup,
        max_grad_norm=d.max_grad_norm if args.max_grad_norm is None else (args.max_grad_norm or None),
        loss=DistillConfig(form=args.loss, hidden_weight=args.hidden_weight),
        blocks=blocks,
        calib_sequences=d.calib_sequences if args.calib_sequences is None else args.calib_sequences,
        act_power=d.act_power if args.act_power is None else args.act_power,
        grad_power=DEFAULT_GRAD_POWER if args.grad_power is None else args.grad_power,
        latent_rms=d.latent_rms if args.latent_rms is None else (args.latent_rms or None),
        train_norms=not args.freeze_norms,
        seed=args.seed,
        data_tokens=args.data_tokens,
        generation=TextGenConfig(
            temperature=args.gen_temperature,
            top_p=args.gen_top_p,
            length=args.seqlen,
            batch_size=args.gen_batch_size,
            starts=[k.strip() for k in args.gen_starts.split(",") if k.strip()],
            seed=args.seed,
            dtype=args.gen_dtype,
        ),
        eval_every=args.eval_every,
        eval_windows=args.eval_windows or None,
        eval_seqlen=args.eval_seqlen,
        save_every=args.save_every,
        save_interval_s=args.save_interval,
        keep_checkpoints=args.keep_checkpoints,
        compile=False if args.no_compile else None,
        cuda_graphs=False if args.no_cuda_graphs else None,
        amp=False if args.no_amp else None,
        grad_checkpoint=args.grad_checkpoint,
        tensorboard=args.tensorboard,
    )
    if not explicit:
        cfg = plan_budget(cfg, DEFAULT_TOKENS if args.tokens is None else args.tokens)
    layout = default_layout(training_tokens(cfg))
    lb = compression_config(args, seed_from_flag=False, layout=layout, sign_function=args.sign)
    return lb, cfg


def relaunch(nproc: int) -> int:
    """``--nproc N``: this same command line, without ``--nproc``, under ``torchrun`` on N processes."""
    from littlebit.training.distributed import launch_env

    if launch_env() is not None:
        raise LittleBitError("--nproc starts torchrun itself: under torchrun, leave it out")
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.call([*torchrun, "-m", "littlebit.cli", *argv])


def sharded_source(
    model: str | None, data: str | None, cfg: TrainConfig, trust_remote_code: bool = False
) -> Path | None:
    """The safetensors directory a sharded run builds both models from, shard by shard: ``model``
    when it is a local directory in the transformers layout, unless the data has generated text
    (generation runs the whole teacher on each process), the initialisation weights rows by the loss
    gradient (a backward pass through the whole teacher) or the model is of a kind that path cannot
    build (``sharded_init.unsupported``). None: every process loads the teacher whole."""
    from littlebit.hf.checkpoint import checkpoint_kind
    from littlebit.hf.shards import is_safetensors_dir
    from littlebit.training.data import generated_tokens_needed

    if model is None or model.endswith(".gguf"):
        return None
    path = Path(model)
    if not (is_safetensors_dir(path) and (path / "config.json").is_file()):
        return None
    if checkpoint_kind(path) == "littlebit":
        return None  # refused by the whole-model loader, with its message
    if generated_tokens_needed(data, cfg):
        log.warning("generated training text needs the whole teacher: every process loads %s whole", model)
        return None
    if cfg.grad_power:
        log.warning(
            "--grad-power runs a backward pass through the whole teacher: every process loads %s", model
        )
        return None
    from littlebit.hf.streaming import meta_skeleton
    from littlebit.training.sharded_init import unsupported

    why = unsupported(meta_skeleton(path, trust_remote_code))
    if why is not None:
        log.warning("every process loads %s whole: %s", model, why)
        return None
    return path


def sharded_plan(
    model: str | None,
    data: str | None,
    cfg: TrainConfig,
    grad_power_asked: bool,
    trust_remote_code: bool = False,
) -> tuple[str | None, TrainConfig, Path | None]:
    """The data spec, config and shard source (``sharded_source``) of a run under torchrun.

    Two defaults need the whole teacher on every process: generated text in the default data
    (budgets above ``MIXTURE_FROM_TOKENS`` with a local corpus) and rows weighted by the loss gradient
    at initialisation. Where the model could otherwise be built shard by shard (a model too large for
    one GPU, which that path exists for), those defaults give way, each with one warning: the local
    corpus alone, rows unweighted. What the command line asked for stays.
    """
    from littlebit.training.data import generated_tokens_needed
    from littlebit.training.data_spec import has_local_corpus

    shard_data = data
    if data is None and generated_tokens_needed(None, cfg) and has_local_corpus():
        shard_data = DEFAULT_WITH_LOCAL_CORPUS
    shard_cfg = cfg if grad_power_asked else dataclasses.replace(cfg, grad_power=0.0)
    source = sharded_source(model, shard_data, shard_cfg, trust_remote_code)
    if source is None:
        return data, cfg, None  # every process loads the teacher whole: the defaults cost nothing more
    if shard_data != data:
        log.warning(
            "under torchrun the default data is %s alone (generated text needs the whole teacher on every "
            "process); pass --data %s for the mixture",
            DEFAULT_WITH_LOCAL_CORPUS,
            DEFAULT_MIXTURE,
        )
    if shard_cfg.grad_power != cfg.grad_power:
        log.warning(
            "under torchrun the initialisation does not weight rows by the loss gradient (a backward pass "
            "through the whole teacher); pass --grad-power %s for it",
            cfg.grad_power,
        )
    return shard_data, shard_cfg, source


def run(args: argparse.Namespace) -> int:
    """Load the model, train, save the compressed model to ``--out``; returns the exit code."""
    import torch

    from littlebit.training.distributed import Distributed, check_config, launch_env

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    launched = launch_env()
    lb, cfg = config_from_args(args)
    if args.nproc is not None and args.nproc < 1:
        raise LittleBitError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc is not None and args.nproc > 1:  # one process: this one, block stage included
        check_config(cfg, args.nproc)  # refused here in one line, not once per process
        return relaunch(args.nproc)
    if launched is not None:
        check_config(cfg, launched[1])
    out = Path(os.path.abspath(args.out))  # "." has no name for the default work directory
    check_output_dir(out)  # before anything loads: the model is saved there only at the end
    work = Path(os.path.abspath(args.work_dir)) if args.work_dir else out.with_name(out.name + "-train")
    if work == out or out in work.parents:
        raise LittleBitError(f"the work directory {work} must be outside the output directory {out}")
    check_writable_dir(work)
    resume = args.resume or args.resume_from is not None
    if work.exists() and any(work.iterdir()) and not resume:
        raise LittleBitError(f"work directory {work} is not empty: pass --resume, or another --work-dir")
    if args.resume_from is not None and not Path(args.resume_from).exists():
        raise LittleBitError(f"no checkpoint {args.resume_from}")
    _check_lengths(args.model, cfg)  # a local folder's config.json, before anything loads
    # Under torchrun every rank checks the directories above before any of them writes: the
    # process group's start waits for all ranks.
    sharded = None
    if launched is not None:
        trust = args.trust_remote_code
        grad_power_asked = args.grad_power is not None
        args.data, cfg, source = sharded_plan(args.model, args.data, cfg, grad_power_asked, trust)
    _check_text_cache(args.generated_dir, args.data, cfg)  # the data torchrun's plan settled on
    if launched is not None:
        sharded = Distributed(offload_teacher=args.offload_teacher, source=source, trust_remote_code=trust)
    try:
        return _train(args, lb, cfg, out, work, resume, sharded)
    finally:
        if sharded is not None:
            sharded.close()


def _check_text_cache(root: str | None, data: str | None, cfg: TrainConfig) -> None:
    """Refuse, before the teacher loads, a cache of generated text that cannot exist. A folder that
    exists is left to the run: read-only, it may already hold every shard the run reads."""
    from littlebit.training.data import generated_tokens_needed
    from littlebit.training.teacher_text import default_cache_dir

    if not generated_tokens_needed(data, cfg):
        return
    path = Path(root) if root is not None else default_cache_dir()
    if not path.is_dir():
        check_writable_dir(path)


def _check_lengths(model, cfg: TrainConfig) -> None:
    check_context(model, cfg.seqlen, f"--seqlen {cfg.seqlen}")
    check_context(model, cfg.eval_seqlen, f"--eval-seqlen {cfg.eval_seqlen}")


def _train(args, lb, cfg, out: Path, work: Path, resume: bool, sharded) -> int:
    import torch

    from littlebit.evaluation.data import test_set_text
    from littlebit.hf.checkpoint import save_compressed
    from littlebit.hf.models import load_model, load_tokenizer
    from littlebit.training.checkpoints import remove_checkpoints
    from littlebit.training.data import generated_tokens_needed
    from littlebit.training.recipe import describe, stages
    from littlebit.training.trainer import train

    device = device_name(args.device)
    if sharded is not None:
        device = str(sharded.device)
    if sharded is not None and sharded.source is not None:
        teacher = sharded.meta_teacher()  # each rank fills its shards once sharded (``Distributed``)
    else:
        teacher = load_model(args.model, device=device, trust_remote_code=args.trust_remote_code)
        _check_lengths(teacher, cfg)  # a GGUF file or a hub model: its context is known once loaded
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    parameters = sum(p.numel() for p in teacher.parameters())
    plan = stages(
        cfg, lb.init, generated_tokens_needed(args.data, cfg), torch.device(device).type, parameters
    )
    # Before the slow part (generation, initialisation), on stderr: stdout carries the JSON summary.
    # The layout is printed because its default depends on the budget (``recipe.default_layout``).
    paths = "two paths (the residual pair)" if lb.residual else "one path"
    split = f", attention at {lb.attention_bpw_factor:g}x" if lb.attention_bpw_factor != 1 else ""
    print(f"layers: {lb.bpw:g} BPW{split}, {paths} each", file=sys.stderr)
    print(describe(plan, torch.device(device).type), file=sys.stderr, flush=True)
    try:
        max_tokens = cfg.eval_windows * cfg.eval_seqlen if cfg.eval_windows else None
        text, _ = test_set_text(args.eval_text, max_tokens=max_tokens)
        eval_ids = tokenizer(text, return_tensors="pt").input_ids
        if eval_ids.shape[1] < cfg.eval_seqlen:  # found now, not at the first evaluation
            raise LittleBitError(
                f"--eval-text {args.eval_text} has {eval_ids.shape[1]} tokens, fewer than one window of "
                f"--eval-seqlen {cfg.eval_seqlen}"
            )
    except LittleBitError as e:
        if args.eval_text != "wikitext2":
            raise  # the text the user named: an error, not a run without its evaluations
        log.warning("no periodic evaluation: %s", e)
        eval_ids = None
    result = train(
        teacher, args.data, lb, cfg, work, tokenizer, eval_ids, resume=resume, resume_from=args.resume_from,
        distributed=sharded, data_cache=args.generated_dir,
    )  # fmt: skip
    if sharded is not None:
        # Every rank takes part; rank 0 gets the model, packed a decoder layer at a time.
        student = sharded.gather_student(result.student, pack=True)
        if sharded.is_main:
            save_compressed(student, out, tokenizer=tokenizer)  # written once
        if not args.keep_state:
            sharded.remove_checkpoints(work)  # waits for rank 0 to have written the model
        if not sharded.is_main:
            return 0
    else:
        save_compressed(result.student, out, tokenizer=tokenizer)
    if not args.keep_state:
        # The model is safely written; the log stays, the (large) optimizer state goes.
        remove_checkpoints(work)
    summary = {"out": str(out), "tokens": result.tokens, "tokens_per_s": result.tokens_per_s}
    if result.history:
        windows = f"{cfg.eval_windows or 'all'}x{cfg.eval_seqlen}"
        label = "wikitext2" if args.eval_text == "wikitext2" else "eval_text"
        summary[f"{label}_ppl_{windows}"] = result.history[-1]["ppl"]
        if label == "eval_text":
            summary["eval_text"] = args.eval_text
    print(json.dumps(summary))
    return 0
