"""Dataset loaders of littlebit's lm-eval tasks: local files laid out like the shared data folder.

lm-eval imports this file by path when it reads a task YAML here; it calls a loader with the task's
metadata as keyword arguments (``data_dir`` when ``littlebit eval`` or ``--metadata`` gives one).
"""

from __future__ import annotations

import json

from littlebit.evaluation.tasks import local_task_dir


def load_piqa(data_dir: str | None = None, **_metadata):
    import datasets

    folder = local_task_dir("piqa", data_dir)
    questions, answers = folder / "valid.jsonl", folder / "valid-labels.lst"
    docs = []
    with open(questions, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                docs.append({k: str(doc[k]) for k in ("goal", "sol1", "sol2")})
            except (ValueError, KeyError, TypeError) as e:  # not JSON, or not a question
                raise ValueError(f"{questions} line {number} is not a PIQA question ({e})") from None
    labels = []
    for number, x in enumerate(answers.read_text(encoding="utf-8").split(), 1):
        if x not in ("0", "1"):
            raise ValueError(f"{answers} label {number} is {x!r}: PIQA labels are 0 or 1")
        labels.append(int(x))
    if len(labels) != len(docs):
        raise ValueError(f"{folder}: {len(docs)} questions but {len(labels)} labels")
    rows = [{**d, "label": y} for d, y in zip(docs, labels, strict=True)]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
