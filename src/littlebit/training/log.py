"""Training records: a JSONL file of losses and evaluations, and TensorBoard when asked for."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from littlebit.config import LittleBitError
from littlebit.evaluation.plots import plot_training

LOG_NAME = "train_log.jsonl"
CURVES_NAME = "train_curves.png"

log = logging.getLogger(__name__)


class TrainLog:
    """Appends one JSON object per line; on resume, drops what the killed run wrote past the checkpoint."""

    def __init__(
        self, directory: str | Path, resume_at: tuple[str, int, int] | None = None, tensorboard: bool = False
    ) -> None:
        """``resume_at`` is ``(phase, global step, next block)`` of the checkpoint resumed from."""
        self.path = Path(directory) / LOG_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_at is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.is_file():
            keep = [
                line for line in self.path.read_text(encoding="utf-8").splitlines() if _keep(line, *resume_at)
            ]
            self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        self.writer = _tensorboard(Path(directory) / "tensorboard") if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.writer is not None and "step" in record:
            phase = record.get("phase", "train")
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.writer.add_scalar(f"{phase}/{key}", value, record["step"])

    def close(self) -> None:
        """Close TensorBoard and draw the log's curves beside it (a plot failure only warns)."""
        if self.writer is not None:
            self.writer.close()
        write_curves(self.path)


def write_curves(log_path: Path) -> Path | None:
    """``train_curves.png`` beside the log, or None with one warning where it cannot be drawn."""
    try:
        return plot_training([log_path], log_path.with_name(CURVES_NAME))
    except Exception as e:  # the model is trained: a figure is never worth failing the run over
        log.warning("no training curves: %s", " ".join(str(e).split()))
        return None


def _keep(line: str, phase: str, step: int, next_block: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False  # a line cut short by the kill
    if record.get("phase") == "blocks":
        return record["block"] < next_block
    return phase != "blocks" and record.get("step", 0) <= step


def _tensorboard(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise LittleBitError("--tensorboard needs TensorBoard: pip install 'littlebit[tensorboard]'") from e
    return SummaryWriter(str(directory))
