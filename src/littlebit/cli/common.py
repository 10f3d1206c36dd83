"""Argument types and the flags every compressing command shares (``compress`` and ``train``).

Nothing here imports torch or transformers, so ``littlebit --help`` answers at once; the commands
import what they need when they run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from littlebit.config import INIT_METHODS, LittleBitConfig, LittleBitError, check_bpw, first_line

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL_HELP = "Hugging Face id, local directory or .gguf file (default: SmolLM2-135M-Instruct)"
UNVERIFIED_HELP = (
    "load a checkpoint that carries no digests (damage would go unnoticed), or whose tokenizer or "
    "generation files were edited since saving (with a warning)"
)
DTYPES = ("float32", "bfloat16", "float16")


def bpw_type(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from e
    try:
        check_bpw(value)
    except LittleBitError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return value


# seeds as torch.Generator takes them, and as LittleBitConfig and the data orders derive theirs
SEED_MAX = 2**63 - 1


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from e
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


# CPU threads: far beyond any machine's cores, and within what torch.set_num_threads takes
threads_type = int_at_least(1, 4096)


def device_name(name: str | None) -> str:
    """``--device``, checked before anything loads (default: cuda when available)."""
    import torch

    if not name:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LittleBitError(f"unknown device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LittleBitError(f"device {name!r} asked for, but no CUDA GPU is available")
    try:
        torch.empty(0, device=device)  # an index past the GPUs there, or a backend this torch lacks
    except (RuntimeError, AssertionError) as e:
        raise LittleBitError(f"device {name!r} cannot be used here: {first_line(e)}") from None
    return name


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def add_compression_arguments(
    p: argparse.ArgumentParser, init_default: str, paths_default: str, attention_default: str = "1"
) -> None:
    """The source model, the output, and what the LittleBitConfig is made of; ``paths_default`` and
    ``attention_default`` say in the help which layout the command picks without the flags."""
    p.add_argument("model", nargs="?", help=DEFAULT_MODEL_HELP)
    p.add_argument("--bpw", type=bpw_type, required=True, help="bits per weight of each compressed layer")
    p.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    p.add_argument(
        "--residual",
        action=argparse.BooleanOptionalAction,
        help=f"two paths per layer (the residual pair) or one of about twice the rank "
        f"(default: {paths_default})",
    )
    p.add_argument(
        "--init", choices=INIT_METHODS, default=init_default, help=f"initialisation (default: {init_default})"
    )
    p.add_argument(
        "--attention-bpw-factor",
        type=float,
        help=f"the attention projections at this multiple of --bpw, the other layers lower so that the mean "
        f"stays --bpw (default: {attention_default})",
    )
    p.add_argument(
        "--kv-rank-multiplier",
        type=float,
        help="rank of the k/v projections relative to the others (default: 1)",
    )
    p.add_argument("--skip", action="append", metavar="GLOB", help="module names to leave uncompressed")
    p.add_argument("--config", help="LittleBitConfig JSON file (flags given here override it)")
    p.add_argument(
        "--seed",
        type=int_at_least(0, SEED_MAX),
        default=0,
        help="random seed: initialisation (compress), data order (train)",
    )
    p.add_argument("--device", help="where to compute (default: cuda when available)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")


# Settings of the layer layout a flag sets over a --config file.
LAYOUT_FLAGS = ("residual", "attention_bpw_factor")


def compression_config(
    args: argparse.Namespace,
    seed_from_flag: bool = True,
    layout: dict[str, Any] | None = None,
    **extra: Any,
) -> LittleBitConfig:
    """The LittleBitConfig the flags ask for (``--config`` first, the flags over it). ``train`` keeps
    ``--seed`` for its data order (``seed_from_flag=False``): its initialisation seed is the config's.
    The layout (``residual``, ``attention_bpw_factor``): each from its flag, else the config file,
    else ``layout`` (``train``'s depends on the budget), else the config's own default."""
    base: dict = {}
    given: dict = {}
    if args.config:
        try:
            given = json.loads(Path(args.config).read_text(encoding="utf-8"))
            base = LittleBitConfig.from_dict(given).to_dict()
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
            raise LittleBitError(f"cannot read the config {args.config}: {first_line(e)}") from e
    base.update({k: v for k, v in (layout or {}).items() if k not in given})
    base.update({k: getattr(args, k) for k in LAYOUT_FLAGS if getattr(args, k) is not None})
    base.update(bpw=args.bpw, init=args.init, **extra)
    if seed_from_flag:
        base["seed"] = args.seed
    if args.kv_rank_multiplier is not None:
        base["kv_rank_multiplier"] = args.kv_rank_multiplier
    if args.skip:
        base["skip"] = [*base.get("skip", []), *args.skip]
    return LittleBitConfig.from_dict(base)


def is_littlebit_dir(path: str | None) -> bool:
    """True for a LittleBit directory; other local directories must hold unquantized models."""
    if path is None or not (Path(path) / "config.json").is_file():
        return False
    from littlebit.hf.checkpoint import checkpoint_kind

    return checkpoint_kind(path) == "littlebit"


def check_context(model: Any, tokens: int, what: str) -> None:
    """Refuse ``tokens`` positions past the model's context (``hf.models.context_length``): beyond it
    the positions were never trained, and the output would be noise rather than an error. ``model``: a
    loaded model, or a model argument (checked before anything loads where it is a local folder)."""
    from littlebit.hf.models import context_length

    context = context_length(model)
    if context is not None and tokens > context:
        raise LittleBitError(f"{what} needs {tokens:,} positions, past the model's {context:,}-token context")
