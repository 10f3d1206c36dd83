"""The ``littlebit`` command: compress, train, eval, info, generate.

Every failure is one line on stderr, never a traceback: exit 2 for bad input, 1 otherwise. Building
the parser imports no torch or transformers, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from littlebit import __version__
from littlebit.cli import compress, evaluate, generate, generate_data, harness, info, plot, train
from littlebit.config import LittleBitError, first_line

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE, the status a shell reports for a command stopped by a closed pipe

COMMANDS = {
    "compress": (compress, "convert and initialise a model's linear layers, save it packed"),
    "train": (train, "recover quality by distillation from the original model, save it packed"),
    "eval": (evaluate, "perplexity of a model or a LittleBit directory"),
    "lm-eval": (harness, "lm-eval's own command line, able to load LittleBit directories"),
    "info": (info, "bits, ranks and sizes of a LittleBit directory"),
    "generate": (generate, "generate text with a LittleBit directory"),
    "generate-data": (generate_data, "the original model writes training text, cached as token shards"),
    "plot": (plot, "training curves, or perplexity against bits per weight, as a PNG"),
}


class _Parser(argparse.ArgumentParser):
    """Usage mistakes get the same one-line error and exit code as every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="littlebit", description="Compress LLMs below one bit per weight (LittleBit).")
    parser.add_argument("--version", action="version", version=f"littlebit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary, formatter_class=argparse.HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so partial outputs are removed on the way out


def _resolves(host: str, timeout: float) -> bool:
    import socket

    found: list[bool] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
            found.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(found)


def _offline_if_hub_unreachable(args: argparse.Namespace) -> None:
    """A model id that is not a local path, or data from the hub (``hf:``), with no route to the hub:
    go offline at once, so it is looked up in the local cache and fails in one line, instead of after
    half a minute of retries."""
    import os
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE"):
        return
    from littlebit.evaluation.data import DATASETS

    model = getattr(args, "model", None)
    hub_model = bool(model) and not os.path.exists(model)
    # a named dataset whose split is not found locally is read from the hub as well
    texts = [str(getattr(args, name, None) or "") for name in ("data", "ppl", "eval_text", "calibration")]
    names = {part.strip().split(":")[0] for t in texts for part in t.split(",")}
    hub_data = any("hf:" in t for t in texts) or bool(names & set(DATASETS))
    if not (hub_model or hub_data):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    if not _resolves(host, timeout=3.0):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit does not fail on the closed pipe."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # stdout is not a file descriptor (captured): nothing is flushed to a pipe


MEMORY_HINT = "fewer sequences a step (--batch-size, --block-batch-size) or shorter ones (--seqlen) need less"


def _out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: torch's CPU allocator raises a plain RuntimeError."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    _offline_if_hub_unreachable(args)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return args.func(args)
    except LittleBitError as e:
        print(f"littlebit: error: {first_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("littlebit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``littlebit info DIR | head``): stop quietly, as a shell tool does.
        _stdout_to_devnull()
        return EXIT_CLOSED_PIPE
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"littlebit: error: {e.strerror or first_line(e)}{where}", file=sys.stderr)
        # a file the user named, or one inside a directory they named, that they may not read or write
        return EXIT_BAD_INPUT if isinstance(e, PermissionError) else EXIT_FAILED
    except Exception as e:
        if args.verbose:
            raise
        if _out_of_memory(e):
            what = f" ({first_line(e)})" if str(e) else ""
            print(f"littlebit: error: out of memory{what}; {MEMORY_HINT}", file=sys.stderr)
            return EXIT_FAILED
        print(
            f"littlebit: error: {type(e).__name__}: {first_line(e)} (--verbose shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
