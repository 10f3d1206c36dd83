"""Zero-shot and few-shot tasks (PIQA, HellaSwag, ARC, ...) through lm-eval's Python API.

Tasks littlebit ships a definition for (``lm_eval_tasks/``, same prompt and metrics as lm-eval's own)
read local files laid out like the shared data folder, so they run where the Hugging Face hub is
unreachable::

    DATA_DIR/piqa/valid.jsonl, DATA_DIR/piqa/valid-labels.lst

Any other task, or a shipped one with no local data, is lm-eval's standard task by name. lm-eval is
imported only when a task runs: it is an optional extra.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from littlebit.config import LittleBitError, first_line
from littlebit.evaluation.data import default_data_dirs

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"

# task name -> (littlebit's lm-eval task, the files it reads from DATA_DIR/<task>/)
LOCAL_TASKS = {"piqa": ("piqa_local", ("valid.jsonl", "valid-labels.lst"))}


def _missing(name: str, where: str) -> str:
    files = " and ".join(LOCAL_TASKS[name][1])
    return f"no local data for {name}: put {files} in {where}/{name}/"


def local_task_dir(name: str, data_dir: str | Path | None = None, required: bool = True) -> Path | None:
    """The folder holding a shipped task's files: ``data_dir/<name>`` when a directory is given,
    otherwise the first default data directory that has them."""
    files = LOCAL_TASKS[name][1]
    candidates = [Path(data_dir)] if data_dir is not None else default_data_dirs()
    for d in candidates:
        if all((d / name / f).is_file() for f in files):
            return d / name
    if required:
        raise LittleBitError(_missing(name, str(data_dir) if data_dir is not None else "DATA"))
    return None


def import_lm_eval() -> ModuleType:
    try:
        import lm_eval
    except ImportError as e:
        raise LittleBitError(
            f"lm-eval is not installed: pip install 'littlebit[eval]' ({first_line(e)})"
        ) from e
    return lm_eval


def load_tasks(names: list[str], data_dir: str | Path | None = None) -> dict:
    """lm-eval Task objects keyed by the name the user gave, local definitions where data is found;
    ``LittleBitError`` in one line when a task's data is neither local nor fetchable. Loading them
    before a long run (training, then scoring) makes missing data fail at the start."""
    from lm_eval.tasks import TaskManager

    loaded = {}
    for name in names:
        folder = (
            local_task_dir(name, data_dir, required=data_dir is not None) if name in LOCAL_TASKS else None
        )
        if folder is not None:
            manager = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": str(folder.parent)})
            task_name = LOCAL_TASKS[name][0]
        else:
            manager, task_name = TaskManager(), name
        try:
            tasks = manager.load([task_name])["tasks"]
        except Exception as e:  # unknown name, or its data cannot be fetched: one line, not a traceback
            if folder is not None:  # the local files are there but cannot be read
                raise LittleBitError(f"cannot read {name} from {folder}: {first_line(e)}") from e
            if name in LOCAL_TASKS:
                raise LittleBitError(
                    f"{_missing(name, 'DATA')} (DATA: --data-dir, $LITTLEBIT_DATA or ./shared/data); "
                    f"lm-eval could not fetch it: {first_line(e)}"
                ) from e
            raise LittleBitError(f"cannot load lm-eval task {name!r}: {first_line(e)}") from e
        if not tasks:
            raise LittleBitError(f"unknown lm-eval task {name!r}")
        for key, task in tasks.items():
            loaded[name if key == task_name else key] = task
    return loaded


def _metrics(row: dict) -> dict[str, float | None]:
    """lm-eval's ``"acc,none"`` / ``"acc_stderr,none"`` keys as ``acc`` / ``acc_stderr``, and how many
    examples were scored as ``samples``."""
    out: dict = {"samples": row.get("sample_len")}
    for key, value in row.items():
        if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
            if value == "N/A":
                out[key.split(",")[0]] = None
            continue
        out[key.split(",")[0]] = float(value)
    return out


def evaluate_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    data_dir: str | Path | None = None,
    loaded: dict | None = None,
) -> dict[str, dict[str, float | None]]:
    """Each task's metrics (``acc``, ``acc_stderr``, ``acc_norm``, ...) for an already loaded model.

    ``loaded``: the tasks from ``load_tasks(names, data_dir)``, when the caller loaded them before the
    model so that an unknown name or missing data failed first."""
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    tasks = loaded if loaded is not None else load_tasks(names, data_dir)
    by_object = {id(t): name for name, t in tasks.items()}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks.values()),
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
    )
    rows = results["results"]
    out = {}
    for name, task in tasks.items():
        key = task.config.task if task.config.task in rows else by_object[id(task)]
        out[name] = _metrics(rows.get(key, {}))
    return out
