"""Digests that make a saved checkpoint refuse to load as anything but the model that was saved.

A LittleBit checkpoint records, inside ``quantization_config``:

* ``tensor_digests``: a digest of every tensor (dtype, shape and bytes);
* ``config_digest``: a digest of ``config.json`` as written, every field that can shape the model's
  output included (architecture fields and ``quantization_config``), version stamps excluded so a
  ``save_pretrained`` round trip with another transformers release stays valid.

* ``file_digests``: a digest of every other file written with the checkpoint (tokenizer, generation
  defaults), recorded by ``seal_side_files`` once they are written and covered by ``config_digest``;
  a checkpoint re-saved by transformers alone has none.

Loading checks them all, and that the tensors in the files are exactly those the model expects (none
missing, none unknown). A checkpoint without digests is refused unless the caller explicitly allows
it (``allow_unverified``, or ``LITTLEBIT_ALLOW_UNVERIFIED=1`` for code that calls transformers
directly).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from littlebit.config import LittleBitError, first_line

# Fields of config.json left out of its digest: stamps of the writing library, not of the model.
UNHASHED_CONFIG_KEYS = ("transformers_version",)
# The digests themselves live in quantization_config and are not part of what they cover; the file
# digests are written after the config digest is first computed, and it is computed again over them.
DIGEST_KEYS = ("tensor_digests", "config_digest")
# Files a loader reads beside the tensors that change what the model does with text: the tokenizer
# (every format transformers reads), its chat template and the generation defaults. One of these added
# after saving is refused, not read unchecked; other files (a model card, .gitattributes) may be added.
_SHAPES_OUTPUT = re.compile(
    r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|generation_config\.json|chat_template\..*"
    r"|vocab\..*|merges\.txt|.*\.model|.*\.tiktoken)"
)
# The one folder a loader reads beside them: the tokenizer's named chat templates (transformers 5).
CHAT_TEMPLATES_DIR = "additional_chat_templates"
ALLOW_UNVERIFIED_ENV = "LITTLEBIT_ALLOW_UNVERIFIED"

log = logging.getLogger(__name__)
_allow_unverified: contextvars.ContextVar[bool] = contextvars.ContextVar("allow_unverified", default=False)


@contextlib.contextmanager
def unverified_loading(allow: bool = True) -> Iterator[None]:
    """Within this block, checkpoints without digests load (with tensors and config unchecked)."""
    token = _allow_unverified.set(allow)
    try:
        yield
    finally:
        _allow_unverified.reset(token)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A checkpoint's files are checked more than once in a command (before and during the load):
    each finding is said once."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def unverified_allowed() -> bool:
    return _allow_unverified.get() or os.environ.get(ALLOW_UNVERIFIED_ENV, "") not in ("", "0")


def tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    if data.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit patterns
        data = data.view(torch.int16)
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()


def state_digests(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: tensor_digest(t) for name, t in sorted(state_dict.items())}


def config_digest(config_json: dict) -> str:
    """Digest of a ``config.json`` mapping, without version stamps and without the digests."""
    data = {k: v for k, v in config_json.items() if k not in UNHASHED_CONFIG_KEYS}
    q = data.get("quantization_config")
    if isinstance(q, dict):
        data["quantization_config"] = {k: v for k, v in q.items() if k not in DIGEST_KEYS}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _side_files(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """Every file of a checkpoint but ``config.json`` and the tensors, which their own digests cover, by
    its name relative to ``directory``: the top-level files and those of ``CHAT_TEMPLATES_DIR``."""
    files = [p for p in directory.iterdir() if p.is_file() and p.name not in skip]
    files = [p for p in files if p.name != "config.json" and p.suffix != ".safetensors"]
    templates = directory / CHAT_TEMPLATES_DIR
    if templates.is_dir():
        files += [p for p in templates.iterdir() if p.is_file()]
    return {p.relative_to(directory).as_posix(): p for p in sorted(files)}


def _listed_name(name: str) -> bool:
    """A name a file digest may have: a top-level file or one of the chat templates' folder."""
    parts = name.split("/")
    plain = all(part and part not in (".", "..") and "\\" not in part for part in parts)
    return plain and (len(parts) == 1 or (len(parts) == 2 and parts[0] == CHAT_TEMPLATES_DIR))


def seal_side_files(directory: Path, skip: tuple[str, ...] = ()) -> None:
    """Record the digest of every file beside the config and the tensors in ``config.json``, and the
    config digest again over them, so that loading checks the tokenizer and generation defaults too.
    Call it once everything is written, inside the not yet published (temporary) directory; ``skip``
    names files there that are removed before it is published."""
    raw = read_config_json(directory)
    q = raw["quantization_config"]
    q["file_digests"] = {name: file_digest(p) for name, p in _side_files(directory, skip).items()}
    q["config_digest"] = config_digest(raw)
    (directory / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def verify_side_files(directory: Path, qconfig: dict, require_all: bool = True) -> None:
    """Refuse files beside the tensors that changed since saving, or that shape the output and were added.

    ``require_all=False`` lets listed files be absent, as in a hub snapshot whose tokenizer is fetched
    after the model; those present are still checked. Where unverified loading is allowed, a file that
    differs is a warning instead: a user may edit a chat template on purpose.
    """
    digests = qconfig.get("file_digests")
    if digests is None:  # re-saved by transformers alone: the tensors and config are still checked
        return
    path = directory / "config.json"
    if not (isinstance(digests, dict) and all(isinstance(d, str) for d in digests.values())):
        raise LittleBitError(f"{path} was altered after saving (its file digests are not a table of names)")
    problems = []
    for name, expected in sorted(digests.items()):
        file = directory / name
        if not _listed_name(name):
            raise LittleBitError(f"{path} was altered after saving (a file digest names {name!r})")
        if not file.is_file():
            if require_all:
                problems.append(f"{file} is missing: it was saved with the checkpoint")
        elif file_digest(file) != expected:
            problems.append(f"{file} was altered after saving (checksum mismatch)")
    side = _side_files(directory)
    added = [
        p
        for name, p in side.items()
        if name not in digests and (_SHAPES_OUTPUT.fullmatch(name) or "/" in name)
    ]
    problems += [f"{p} was added after saving" for p in added]
    if problems and unverified_allowed():
        _warn_once(f"loading anyway, as asked: {'; '.join(problems)}")
    elif problems:
        raise LittleBitError(
            f"{problems[0]} (to load it anyway: --allow-unverified, or {ALLOW_UNVERIFIED_ENV}=1)"
        )


def read_config_json(path: Path) -> dict:
    """``config.json`` of the model directory ``path``, parsed; anything else is a one-line error."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LittleBitError(f"{path} is not a model directory (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LittleBitError(f"{cfg_file} is not valid JSON: {e}") from e
    except OSError as e:
        raise LittleBitError(f"cannot read {cfg_file}: {e.strerror or first_line(e)}") from None
    if not isinstance(cfg, dict):
        raise LittleBitError(f"{cfg_file} does not hold a JSON object")
    return cfg


def verify_config_file(directory: Path, require_side_files: bool = True) -> dict:
    """The checkpoint's ``config.json``, checked against its own digest, and the files beside it against
    theirs (``verify_side_files``); returns the parsed mapping."""
    path = directory / "config.json"
    raw = read_config_json(directory)
    q = raw.get("quantization_config")
    if not isinstance(q, dict):
        raise LittleBitError(f"{path} has no quantization_config")
    expected = q.get("config_digest")
    if expected is not None and config_digest(raw) != expected:  # a digest that is there always counts
        raise LittleBitError(f"{path} was altered after saving (config digest mismatch)")
    if expected is None or not q.get("tensor_digests"):
        if unverified_allowed():
            what = "config digest" if expected is None else "tensor digests"
            _warn_once(f"loading {directory} unverified, as asked: it carries no {what}")
            return raw
        raise LittleBitError(
            f"{directory} carries no digests, so damage cannot be detected: refusing to load it "
            f"(to load it anyway: --allow-unverified, or {ALLOW_UNVERIFIED_ENV}=1)"
        )
    digests = q["tensor_digests"]
    if not (isinstance(digests, dict) and all(isinstance(d, str) for d in digests.values())):
        raise LittleBitError(f"{path} was altered after saving (its tensor digests are not a table of names)")
    verify_side_files(directory, q, require_side_files)
    return raw


def verify_files(
    files: list[str],
    qconfig: dict,
    expected_shapes: dict[str, tuple],
    tied_names: dict[str, list[str]] | None = None,
) -> None:
    """Refuse files whose tensors are missing, unknown, truncated, altered or shaped unlike the model.

    ``expected_shapes`` maps every tensor name the model loads to its shape; ``tied_names`` maps a
    name to the names that share its storage (a checkpoint holds one of each tied group).
    """
    from safetensors import safe_open

    digests = qconfig.get("tensor_digests") or {}
    if not digests and not unverified_allowed():
        raise LittleBitError("the checkpoint has no tensor digests: refusing to load it unverified")
    seen: set[str] = set()
    for file in files:
        name_of_file = Path(file).name
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name not in expected_shapes:
                        raise LittleBitError(f"{name_of_file} holds a tensor the model does not have: {name}")
                    t = f.get_tensor(name)
                    if tuple(t.shape) != tuple(expected_shapes[name]):
                        raise LittleBitError(
                            f"{name}: shape {tuple(t.shape)} in {name_of_file} disagrees with the config "
                            f"({tuple(expected_shapes[name])})"
                        )
                    if digests and digests.get(name) != tensor_digest(t):
                        what = "has no digest" if name not in digests else "is damaged (checksum mismatch)"
                        raise LittleBitError(f"{name} in {name_of_file} {what}")
                    seen.add(name)
        except LittleBitError:
            raise
        except PermissionError:
            raise LittleBitError(f"cannot read {file}: permission denied") from None
        except Exception as e:
            raise LittleBitError(f"cannot read {file}: damaged or truncated ({first_line(e)})") from e
    tied_names = tied_names or {}
    covered = set(seen)
    for name in seen:
        covered.update(tied_names.get(name, ()))
    missing = sorted(set(expected_shapes) - covered)
    if missing:
        raise LittleBitError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]}")
    extra = sorted(set(digests) - covered)
    if extra:
        raise LittleBitError(f"checkpoint lists {len(extra)} tensor(s) its files lack, e.g. {extra[0]}")
