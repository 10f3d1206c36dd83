"""Figures: training curves from JSONL training logs, perplexity against bits per weight from
benchmark result files (``benchmarks/results/qat.json`` and ``ptq.json``), and held-out quality
against training tokens from QAT result files.

matplotlib is optional (``pip install 'littlebit[plot]'``) and imported only when a figure is drawn.
Figures are drawn on an Agg canvas of their own, never through pyplot, so drawing one changes no
global backend of the calling program. Every figure is written all or nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from littlebit.atomic import check_writable_dir, make_parents, remove_empty
from littlebit.config import LittleBitError, first_line

TRAINING = "training"
QUALITY = "quality"
COMPUTE = "compute"
_PHASES = ("global", "eval", "blocks")


def _figure(*args, **kwargs):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LittleBitError("plotting needs matplotlib: pip install 'littlebit[plot]'") from None
    fig = Figure(*args, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out: str | Path) -> Path:
    """Write ``fig`` as a PNG to a temporary sibling of ``out``, then rename it into place."""
    out = Path(out)
    if not out.name or out.is_dir():
        raise LittleBitError(f"--out {str(out)!r} is a directory: name the PNG to write")
    if out.suffix and out.suffix.lower() != ".png":
        raise LittleBitError(f"--out {str(out)!r}: the figure is a PNG, name it *.png")
    if out.exists() and not out.is_file():  # renaming over a device or a pipe would replace it
        raise LittleBitError(f"--out {str(out)!r} is not a regular file: name the PNG to write")
    check_writable_dir(out.parent)
    created: list[Path] = []
    try:
        created = make_parents(out.parent)
        # a short temporary name: a long --out must not push it past the file system's limit
        fd, tmp = tempfile.mkstemp(prefix=".plot.tmp-", suffix=".png", dir=out.parent)
    except OSError as e:
        remove_empty(created)
        raise LittleBitError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                fig.savefig(f, format="png", dpi=120)
            except (ValueError, OverflowError) as e:  # values too extreme to lay out
                raise LittleBitError(f"cannot draw {out}: {first_line(e)} (values out of range)") from None
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        remove_empty(created)
        raise
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is not text
    except UnicodeDecodeError:
        raise LittleBitError(f"cannot read {path}: not UTF-8 text") from None
    except OSError as e:
        raise LittleBitError(f"cannot read {path}: {e.strerror or e}") from None


# ----- reading ------------------------------------------------------------------------------------


def _training_records(text: str) -> list[dict[str, Any]]:
    """The training records of a JSONL text; other lines (one cut short by a kill) are skipped."""
    records = []
    for line in text.splitlines():
        record = _json(line)
        if isinstance(record, dict) and record.get("phase") in _PHASES:
            records.append(record)
    return records


def _quality_points(data: Any) -> list[dict[str, Any]] | None:
    """``[{series, bpw, ppl, fp}]`` of a benchmark result file's content, or None if it is not one.

    qat.json is a list of runs (``bpw_linear``, ``wikitext2_ppl``, ``init``, ``variant``); ptq.json a
    dict whose ``records`` carry ``method``, ``bpw_linear`` and ``wikitext2``, the FP model as method "fp".
    """
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        runs = [r for r in data if _number(r.get("bpw_linear")) and _number(r.get("wikitext2_ppl"))]
        # The runs compare recipes on one token budget; a run on another (a throughput run of a few
        # steps) says nothing about quality and would only stretch the axis.
        for r in runs:  # a budget that is not a number is no budget
            if not _number(r.get("tokens")):
                r["tokens"] = None
        budgets = Counter(r["tokens"] for r in runs)
        budget = budgets.most_common(1)[0][0] if budgets else None
        points = [
            {
                "series": f"{r.get('init', '?')} {r.get('variant', 'default')}",
                "bpw": r["bpw_linear"],
                "ppl": r["wikitext2_ppl"],
                "fp": False,
                "tokens": budget,
            }
            for r in runs
            if r["tokens"] == budget
        ]
        return points or None
    if isinstance(data, dict) and isinstance(data.get("records"), list):
        points = [
            {
                "series": str(r["method"]),
                "bpw": r.get("bpw_linear"),
                "ppl": r["wikitext2"],
                "fp": r["method"] == "fp",
            }
            for r in data["records"]
            if isinstance(r, dict)
            and "method" in r
            and _number(r.get("wikitext2"))
            and (r["method"] == "fp" or _number(r.get("bpw_linear")))
        ]
        return points or None
    return None


def _number(x: Any) -> bool:
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        value = float(x)
    except OverflowError:  # an integer past float's range
        return False
    return math.isfinite(value) and value > 0


def _json(text: str) -> Any:
    """Parsed JSON, or None for text that is not JSON (or JSON too large or deep to read)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, integers past the digit limit, deep nesting
        return None


def detect(path: str | Path) -> tuple[str, Any]:
    """``(TRAINING, records)`` for a JSONL training log, ``(QUALITY, points)`` for a benchmark result file.

    Raises a one-line ``LittleBitError`` for a file that cannot be read or is neither.
    """
    path = Path(path)
    text = _read_text(path)
    data = _json(text)
    if data is not None:
        points = _quality_points(data)
        if points is not None:
            return QUALITY, points
    records = _training_records(text)
    if records:
        return TRAINING, records
    raise LittleBitError(
        f"{path} is neither a training log (train_log.jsonl) nor a benchmark result file (qat.json, ptq.json)"
    )


def _load(path: str | Path, kind: str) -> Any:
    found, content = detect(path)
    if found != kind:
        raise LittleBitError(f"{path} is a {found} file, not a {kind} one")
    return content


# ----- training curves ----------------------------------------------------------------------------


def _runs(path: Path, records: list[dict], name: str | None) -> list[tuple[str, list[dict]]]:
    """One ``(name, records)`` per run: benchmark logs tag each record with its ``run``."""
    base = name or (path.parent.name if path.name == "train_log.jsonl" and path.parent.name else path.stem)
    tags = list(dict.fromkeys(str(r["run"]) for r in records if "run" in r))
    if len(tags) <= 1:
        return [(base if not tags or name else tags[0], records)]
    return [(tag, [r for r in records if "run" in r and str(r["run"]) == tag]) for tag in tags]


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training(logs: Sequence[str | Path], out: str | Path, names: Sequence[str] | None = None) -> Path:
    """Loss, tokens/s and evaluation perplexity against training tokens, one line per log; the PNG's path."""
    runs: list[tuple[str, list[dict]]] = []
    for i, log in enumerate(logs):
        runs += _runs(Path(log), _load(log, TRAINING), names[i] if names else None)
    labels = [name for name, _ in runs]
    if len(set(labels)) < len(labels):  # two logs named alike (each a train_log.jsonl): use their paths
        labels = [str(Path(log)) for log in logs] if len(runs) == len(logs) else labels
    fig = _figure(figsize=(15, 4.2), layout="constrained")
    ax_loss, ax_speed, ax_ppl = fig.subplots(1, 3)
    for (_, records), label in zip(runs, labels, strict=True):
        steps = [r for r in records if r["phase"] == "global" and _number(r.get("tokens"))]
        window = max(1, len(steps) // 50)
        color = None
        if steps:
            tokens = [r["tokens"] for r in steps]
            loss = [float(r["loss"]) if _number(r.get("loss")) else math.nan for r in steps]
            (line,) = ax_loss.plot(tokens, loss, lw=0.6, alpha=0.3)
            color = line.get_color()
            ax_loss.plot(tokens, _smooth(loss, window), color=color, lw=1.5, label=label)
            speed = [float(r["tokens_per_s"]) if _number(r.get("tokens_per_s")) else math.nan for r in steps]
            ax_speed.plot(tokens, _smooth(speed, window), color=color, lw=1.5, label=label)
        evals = [
            r for r in records if r["phase"] == "eval" and _number(r.get("ppl")) and _number(r.get("tokens"))
        ]
        if evals:
            (line,) = ax_ppl.plot(
                [r["tokens"] for r in evals], [r["ppl"] for r in evals], "o-", color=color, ms=3, label=label
            )
            color = line.get_color()
        blocks = [r for r in records if r["phase"] == "blocks" and _number(r.get("tokens"))]
        if blocks and steps:  # where the block stage hands over to global distillation
            for ax in (ax_loss, ax_speed, ax_ppl):
                ax.axvline(blocks[-1]["tokens"], color=color, lw=0.8, ls=":")
    window_note = " (moving average)" if any(len(r) > 100 for _, r in runs) else ""
    ax_loss.set(xlabel="training tokens", ylabel="loss", title="distillation loss" + window_note)
    ax_speed.set(xlabel="training tokens", ylabel="tokens/s", title="training throughput")
    ax_ppl.set(xlabel="training tokens", ylabel="perplexity", title="evaluation perplexity")
    if ax_ppl.lines:
        ax_ppl.set_yscale("log")
    losses = [y for line in ax_loss.lines for y in line.get_ydata()]
    if losses and min(losses) > 0:  # distillation losses fall by orders of magnitude early on
        ax_loss.set_yscale("log")
    for ax in (ax_loss, ax_speed, ax_ppl):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, out)


# ----- quality against size -------------------------------------------------------------------------


def plot_quality(results: Sequence[str | Path], out: str | Path) -> Path:
    """WikiText-2 perplexity (log) against bits per weight of the linear layers, one line per method or
    recipe; the FP model as a horizontal line where a file has it. The PNG's path.

    In QAT results most recipes are ablations run at one BPW only: those share one grey legend entry,
    so the legend names the recipes that were run across sizes.
    """
    series: dict[str, dict[float, float]] = {}
    fp: list[tuple[str, float]] = []
    budgets: set[int] = set()
    for path in results:
        prefix = f"{Path(path).stem}: " if len(results) > 1 else ""
        for p in _load(path, QUALITY):
            if _number(p.get("tokens")):
                budgets.add(p["tokens"])
            if p["fp"]:
                fp.append((prefix + "FP16", p["ppl"]))
            else:
                series.setdefault(prefix + p["series"], {})[p["bpw"]] = p["ppl"]  # a rerun replaces
    fig = _figure(figsize=(9, 6), layout="constrained")
    ax = fig.subplots()
    lines = {k: v for k, v in series.items() if len(v) > 1}
    singles = {k: v for k, v in series.items() if len(v) == 1}
    # Grey is kept for the one-BPW recipes.
    colors = [c for i, c in enumerate(_palette()) if i % 10 != 7]
    for i, (name, points) in enumerate(sorted(lines.items(), key=lambda kv: min(kv[1].values()))):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], "o-", ms=4, color=colors[i % len(colors)], label=name)
    if singles:
        xs = [x for v in singles.values() for x in v]
        ys = [y for v in singles.values() for y in v.values()]
        label = f"other recipes, one BPW each ({len(singles)})" if lines else None
        ax.plot(xs, ys, "o", color="0.6", ms=4, label=label, zorder=1)
        if not lines:
            for name, v in singles.items():
                ((x, y),) = v.items()
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for i, (name, ppl) in enumerate(fp):
        ax.axhline(ppl, color="k", ls="--", lw=1, alpha=0.8 - 0.2 * i, label=f"{name} ({ppl:.1f})")
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    if high / low < 100:  # a decade or two: plain numbers read better than powers of ten
        from matplotlib.ticker import FuncFormatter

        plain = FuncFormatter(lambda y, _: f"{y:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set(
        xlabel="bits per weight of the linear layers",
        ylabel="WikiText-2 perplexity",
        title="quality against size"
        + (f" (trained on {budgets.pop() / 1e6:.1f}M tokens)" if len(budgets) == 1 else ""),
    )
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # points annotated by name alone need no legend
        ax.legend(fontsize=8)
    return _save(fig, out)


# ----- quality against training tokens -------------------------------------------------------------


def _variant(run: dict) -> str:
    """A run's variant less its data order (``seed1``, ``X-seed1``): data orders share a curve."""
    return re.sub(r"(^|-)seed\d+$", "", str(run.get("variant", "default"))) or "default"


def _recipe(run: dict, with_variant: bool) -> str:
    """A run's curve: its BPW, layout and attention share of the bits, and its variant unless told."""
    config = run.get("littlebit_config") if isinstance(run.get("littlebit_config"), dict) else {}
    parts = [f"{run['bpw_target']:g} BPW"]
    if config.get("residual") is True:
        parts.append("two paths")
    factor = config.get("attention_bpw_factor")
    if _number(factor) and factor != 1:
        parts.append(f"attention at {factor:g}x")
    if with_variant and _variant(run) != "default":
        parts.append(_variant(run))
    return ", ".join(parts)


def compute_points(path: str | Path, variants: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``[{series, tokens, headline}]``: the runs of a QAT result file scored on held-out text; with
    ``variants``, only those variants' runs, drawn by BPW, layout and attention share alone."""
    path = Path(path)
    data = _json(_read_text(path))
    runs = data if isinstance(data, list) else []
    scored = [
        r
        for r in runs
        if isinstance(r, dict) and all(_number(r.get(k)) for k in ("headline", "tokens", "bpw_target"))
    ]
    if not scored:
        raise LittleBitError(
            f"{path} has no training runs scored on held-out text (qat.json runs with a headline)"
        )
    return [
        {"series": _recipe(r, variants is None), "tokens": r["tokens"], "headline": r["headline"]}
        for r in scored
        if variants is None or _variant(r) in variants
    ]


def plot_compute(
    results: Sequence[str | Path], out: str | Path, variants: Sequence[str] | None = None
) -> Path:
    """The held-out headline (the geometric mean of the ratios to FP of WikiText-2 and PTB perplexity
    and PIQA accuracy; 1 is the FP model) against training tokens, one line per recipe through the
    mean of its runs at each budget (data orders, machines), every run a dot; recipes run at one
    budget only share one grey legend entry; ``variants`` as in ``compute_points``. The PNG's path."""
    series: dict[str, dict[float, list[float]]] = {}
    for path in results:
        for p in compute_points(path, variants):
            series.setdefault(p["series"], {}).setdefault(p["tokens"], []).append(p["headline"])
    if not series:
        raise LittleBitError(f"no runs of the variants {', '.join(variants or ())} in the files")
    fig = _figure(figsize=(9, 6), layout="constrained")
    ax = fig.subplots()
    lines = {k: v for k, v in series.items() if len(v) > 1}
    singles = [(x, y) for k, v in series.items() if len(v) == 1 for x, ys in v.items() for y in ys]
    colors = [c for i, c in enumerate(_palette()) if i % 10 != 7]  # grey is the single budgets'
    for i, (name, runs) in enumerate(sorted(lines.items())):
        xs = sorted(runs)
        color = colors[i % len(colors)]
        ax.plot(xs, [sum(runs[x]) / len(runs[x]) for x in xs], "-", color=color, label=name)
        ax.plot([x for x in xs for _ in runs[x]], [y for x in xs for y in runs[x]], "o", ms=4, color=color)
    if singles:
        label = f"recipes run at one budget ({len(series) - len(lines)})"
        ax.plot(*zip(*singles, strict=True), "o", color="0.6", ms=4, label=label, zorder=1)
    ax.set_xscale("log")
    ax.set(
        xlabel="training tokens",
        ylabel="headline: geometric mean of the ratios to FP (lower is better)",
        title="held-out quality against training tokens",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def _palette() -> list:
    from matplotlib import colormaps

    return list(colormaps["tab10"].colors) + list(colormaps["tab20b"].colors)


def plot_files(
    files: Sequence[str | Path], out: str | Path, kind: str = "auto", variants: Sequence[str] | None = None
) -> Path:
    """Plot ``files`` as ``kind`` (``auto``: what the files are; all must be of one kind); ``variants``
    for ``compute`` (``compute_points``). The PNG's path."""
    if not files:
        raise LittleBitError("no files to plot")
    if Path(out).exists() and any(Path(out).samefile(f) for f in files if Path(f).exists()):
        raise LittleBitError(f"--out {str(out)!r} is one of the files to plot: name another PNG")
    if kind == "auto":
        kinds = {detect(f)[0] for f in files}
        if len(kinds) > 1:
            raise LittleBitError("training logs and benchmark results cannot share a figure: plot them apart")
        (kind,) = kinds
    draw = {TRAINING: plot_training, QUALITY: plot_quality, COMPUTE: plot_compute}.get(kind)
    if draw is not None:
        with warnings.catch_warnings():  # numpy's overflow warnings on extreme values: the error says it
            warnings.simplefilter("ignore", RuntimeWarning)
            return draw(files, out, variants) if kind == COMPUTE else draw(files, out)
    raise LittleBitError(f"unknown plot kind {kind!r}: auto, {TRAINING}, {QUALITY} or {COMPUTE}")
