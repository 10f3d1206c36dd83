"""``littlebit lm-eval ARGS...``: lm-eval's own command line, able to load LittleBit directories.

Every argument goes to lm-eval unchanged (``--model hf --model_args pretrained=DIR --tasks piqa``);
littlebit only registers its quantizer first, so transformers knows the ``littlebit`` quantization
type of a LittleBit directory's config. littlebit's offline tasks are lm-eval task files:
``--include_path`` with the folder ``littlebit lm-eval --littlebit-tasks-dir`` prints.
"""

from __future__ import annotations

import argparse
import sys

from littlebit.config import LittleBitError, first_line

TASKS_DIR_FLAG = "--littlebit-tasks-dir"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's arguments (lm-eval run --help)")

    # argparse stops at the first unknown option even with REMAINDER: everything after the command
    # name belongs to lm-eval, its -h included, so this parser takes the words without reading them.
    def pass_through(args=None, namespace=None):
        namespace, _ = argparse.ArgumentParser.parse_known_args(p, [], namespace)  # the defaults
        namespace.args = list(args or [])
        namespace.model = pretrained(namespace.args)  # for the offline switch every command has
        return namespace, []

    p.parse_known_args = pass_through  # type: ignore[method-assign]


def _option(argv: list[str], names: tuple[str, ...]) -> str | None:
    """The value of the last of lm-eval's options ``names`` (``--name VALUE`` or ``--name=VALUE``)."""
    value = None
    for i, word in enumerate(argv):
        if word in names and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(tuple(f"{n}=" for n in names if n.startswith("--"))):
            value = word.split("=", 1)[1]
    return value


def pretrained(argv: list[str]) -> str | None:
    """The model of lm-eval's ``--model_args pretrained=...,key=value``, if named."""
    for item in (_option(argv, ("--model_args",)) or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "pretrained" and value:
            return value
    return None


def _check_pretrained(value: str | None) -> None:
    """A ``pretrained=`` path that does not exist reached the hub client, whose answer (a malformed
    repo id) names neither the path nor the problem. A hub id has at most one ``/`` and no leading
    ``.``, ``/`` or ``~``; anything else is a path."""
    import os

    if value is None:
        return
    path_like = value.startswith((".", "/", "~")) or value.count("/") > 1
    path_like = path_like or (os.sep != "/" and os.sep in value)
    if path_like and not os.path.exists(os.path.expanduser(value)):
        raise LittleBitError(f"--model_args pretrained={value}: no such folder")


def _check_output_path(argv: list[str]) -> None:
    """lm-eval only logs that it could not save its results, after the whole run, and exits 0: refuse
    an unusable place first (a folder, or a ``.json`` file in one)."""
    from pathlib import Path

    from littlebit.atomic import check_writable_dir

    value = _option(argv, ("--output_path", "-o"))
    if value is not None:
        path = Path(value)
        check_writable_dir(path.parent if path.suffix == ".json" else path)


def run(args: argparse.Namespace) -> int:
    if args.args == [TASKS_DIR_FLAG]:
        from littlebit.evaluation.tasks import TASKS_DIR

        print(TASKS_DIR)
        return 0
    from littlebit.evaluation.tasks import import_lm_eval
    from littlebit.hf.quantizer import register_quantizer

    import_lm_eval()
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise LittleBitError(f"this lm-eval has no command-line entry point: {e}") from e
    _check_output_path(args.args)
    _check_pretrained(args.model)  # ``pretrained(args.args)``, parsed with the arguments
    register_quantizer()
    saved = sys.argv
    sys.argv = ["lm-eval", *args.args]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except ValueError as e:  # how lm-eval answers task names it does not know
        if "Tasks not found" in str(e):
            raise LittleBitError(first_line(e)) from e
        raise
    finally:
        sys.argv = saved
    return 0
