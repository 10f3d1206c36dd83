"""The ``littlebit`` command: compress, train, eval, info, generate.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

import torch

from .config import LittleBitConfig, LittleBitError, check_bpw, first_line
from .data import DATASETS

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError as e:
        raise LittleBitError(f"unknown dtype {name!r}; use float32, bfloat16 or float16") from e


def _bpw(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from e
    try:
        check_bpw(value)
    except LittleBitError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return value


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from e
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _is_littlebit_dir(path: str | None) -> bool:
    """True for a LittleBit directory; other local directories must be unquantized models."""
    from .serialization import checkpoint_kind

    if path is None or not (Path(path) / "config.json").is_file():
        return False
    return checkpoint_kind(path) == "littlebit"


def config_from_args(args: argparse.Namespace) -> LittleBitConfig:
    base = {}
    if args.config:
        try:
            base = LittleBitConfig.from_json(Path(args.config).read_text(encoding="utf-8")).to_dict()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
            raise LittleBitError(f"cannot read the config {args.config}: {first_line(e)}") from e
    base.update(bpw=args.bpw, residual=not args.no_residual, init=args.init, seed=args.seed)
    if args.kv_rank_multiplier is not None:
        base["kv_rank_multiplier"] = args.kv_rank_multiplier
    if args.skip:
        base["skip"] = [*base.get("skip", []), *args.skip]
    return LittleBitConfig.from_dict(base)


def add_compression_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", help="Hugging Face id, local directory or .gguf (default: SmolLM2-135M)"
    )
    p.add_argument("--bpw", type=_bpw, required=True, help="target bits per weight of the decoder linears")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--no-residual", action="store_true", help="one path instead of two")
    p.add_argument("--init", choices=("dual-svid", "itq"), default="dual-svid")
    p.add_argument("--kv-rank-multiplier", type=float, help="rank of k/v projections relative to the others")
    p.add_argument("--skip", action="append", metavar="GLOB", help="module names to leave uncompressed")
    p.add_argument("--config", help="LittleBitConfig JSON file (command-line flags override it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="where to run (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("float32", "bfloat16", "float16"),
        help="precision of the uncompressed weights saved",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")


def cmd_compress(args: argparse.Namespace) -> int:
    from .atomic import check_output_dir
    from .convert import convert
    from .models import load_model, load_tokenizer
    from .serialization import save_compressed

    config = config_from_args(args)
    check_output_dir(Path(args.out))  # fail before the slow part if the output is unusable
    dtype = _dtype(args.dtype)
    device = _device(args.device)
    t0 = time.perf_counter()
    model = load_model(args.model, torch.float32, device, args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    t1 = time.perf_counter()
    report = convert(model, config, compute_device=device)
    t2 = time.perf_counter()
    save_compressed(model, args.out, tokenizer, config, dtype=dtype)
    print(
        f"compressed {args.model or 'SmolLM2-135M-Instruct'}: {len(report.layers)} layers, "
        f"BPW {report.bpw_linear:.4f} (linear), {report.bpw_total:.4f} (all weights); "
        f"load {t1 - t0:.1f}s, compress {t2 - t1:.1f}s -> {args.out}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_perplexity
    from .models import load_model, load_tokenizer
    from .serialization import load_compressed

    names = [n.strip() for n in args.ppl.split(",") if n.strip()]
    for n in names:
        if n not in DATASETS:
            raise LittleBitError(f"unknown dataset {n!r}; choose from {', '.join(DATASETS)}")
    device = _device(args.device)
    dtype = _dtype(args.dtype)
    if _is_littlebit_dir(args.model):
        allow = args.allow_unverified
        model = load_compressed(args.model, device=device, dtype=dtype, allow_unverified=allow)
    else:
        model = load_model(args.model, dtype, device, args.trust_remote_code)
        if args.baseline:
            from .baselines import apply_baseline

            apply_baseline(model, args.baseline, args.bpw or 1.0)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    results = evaluate_perplexity(
        model, tokenizer, names, args.seqlen, args.max_windows, args.data_dir, progress=not args.json
    )
    if args.json:
        print(json.dumps(results))
    else:
        for name, ppl in results.items():
            print(f"{name}: perplexity {ppl:.2f} (seqlen {args.seqlen})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .report import checkpoint_info

    info = checkpoint_info(args.dir, measure_memory=not args.no_load, allow_unverified=args.allow_unverified)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{'layer':<48} {'shape':>12} {'rank':>5} {'bpw':>7} {'bytes':>10}")
    for layer in info["layers"]:
        shape = "x".join(map(str, layer["shape"]))
        print(f"{layer['name']:<48} {shape:>12} {layer['rank']:>5} {layer['bpw']:>7.4f} {layer['bytes']:>10}")
    print(f"BPW (linear layers): {info['bpw_linear']:.4f}   BPW (all weights): {info['bpw_total']:.4f}")
    print(f"parameters: {info['n_params']:,}   FP16 size: {info['fp16_bytes']:,} bytes")
    print(f"bytes on disk: {info['bytes_on_disk']:,}   expected: {info['bytes_expected']:,}")
    if "bytes_in_memory" in info:
        print(f"bytes in memory: {info['bytes_in_memory']:,}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import generate_command

    return generate_command(args)


_UNVERIFIED_HELP = "load a checkpoint that carries no digests (damage cannot be detected)"


class _Parser(argparse.ArgumentParser):
    """Usage mistakes get the same one-line error and exit code as every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="littlebit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="convert and initialise a model, save it packed")
    add_compression_arguments(p)
    p.set_defaults(func=cmd_compress)

    from .train_command import add_train_arguments, run_train

    p = sub.add_parser("train", help="recover quality by distillation from the original model")
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    p = sub.add_parser("eval", help="perplexity of a model or a LittleBit directory")
    p.add_argument("model", nargs="?", help="LittleBit directory, Hugging Face id or local model (default)")
    p.add_argument("--ppl", default="wikitext2", help=f"comma-separated datasets: {','.join(DATASETS)}")
    p.add_argument("--seqlen", type=_int_at_least(2), default=2048, help="tokens per window (default: 2048)")
    p.add_argument("--max-windows", type=_int_at_least(1), help="evaluate only the first N windows")
    p.add_argument("--data-dir", help="folder laid out like shared/data")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--allow-unverified", action="store_true", help=_UNVERIFIED_HELP)
    p.add_argument("--baseline", choices=("svd", "onebit"), help="evaluate a baseline instead of the model")
    p.add_argument("--bpw", type=_bpw, help="bit budget of --baseline svd")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="bits, ranks and sizes of a LittleBit directory")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-load", action="store_true", help="skip loading the model to measure memory")
    p.add_argument("--allow-unverified", action="store_true", help=_UNVERIFIED_HELP)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text with a LittleBit directory")
    p.add_argument("dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=64)
    p.add_argument("--allow-unverified", action="store_true", help=_UNVERIFIED_HELP)
    p.add_argument("--device")
    p.add_argument("--latent-kv", action="store_true", help="cache k/v latents instead of K and V")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(func=cmd_generate)
    return parser


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so partial outputs are removed on the way out


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure is one line on stderr: exit 2 for bad input, 1 otherwise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        return args.func(args)
    except LittleBitError as e:
        print(f"littlebit: error: {first_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("littlebit: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"littlebit: error: {e.strerror or first_line(e)}{where}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:
        if args.verbose:
            raise
        print(
            f"littlebit: error: {type(e).__name__}: {first_line(e)} (--verbose shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
