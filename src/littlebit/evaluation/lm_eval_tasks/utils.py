"""Dataset loaders of littlebit's lm-eval tasks: local files laid out like the shared data folder.

lm-eval imports this file by path when it reads a task YAML here; it calls a loader with the task's
metadata as keyword arguments (``data_dir`` when ``littlebit eval`` or ``--metadata`` gives one).
"""

from __future__ import annotations

import json
from pathlib import Path

from littlebit.evaluation.tasks import local_task_dir


def load_piqa(data_dir: str | None = None, **_metadata):
    import datasets

    folder = local_task_dir("piqa", data_dir)
    with open(folder / "valid.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    labels = [int(x) for x in Path(folder / "valid-labels.lst").read_text(encoding="utf-8").split()]
    if len(labels) != len(docs):
        raise ValueError(f"{folder}: {len(docs)} questions but {len(labels)} labels")
    rows = [
        {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y}
        for d, y in zip(docs, labels, strict=True)
    ]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
