"""``littlebit lm-eval ARGS...``: lm-eval's own command line, able to load LittleBit directories.

Every argument goes to lm-eval unchanged (``--model hf --model_args pretrained=DIR --tasks piqa``);
littlebit only registers its quantizer first, so transformers knows the ``littlebit`` quantization
type of a LittleBit directory's config. littlebit's offline tasks are lm-eval task files:
``--include_path`` with the folder ``littlebit lm-eval --littlebit-tasks-dir`` prints.
"""

from __future__ import annotations

import argparse
import sys

from littlebit.config import LittleBitError

TASKS_DIR_FLAG = "--littlebit-tasks-dir"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's arguments (lm-eval run --help)")

    # argparse stops at the first unknown option even with REMAINDER: everything after the command
    # name belongs to lm-eval, its -h included, so this parser takes the words without reading them.
    def pass_through(args=None, namespace=None):
        namespace, _ = argparse.ArgumentParser.parse_known_args(p, [], namespace)  # the defaults
        namespace.args = list(args or [])
        return namespace, []

    p.parse_known_args = pass_through  # type: ignore[method-assign]


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
    register_quantizer()
    saved = sys.argv
    sys.argv = ["lm-eval", *args.args]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0
