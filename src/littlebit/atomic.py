"""Writing outputs all or nothing: a temporary sibling that is renamed into place once complete.

A failure (an exception, Ctrl-C, SIGTERM, a full disk) removes the temporary files and any parent
directories this write created; a SIGKILL cannot be cleaned up at that moment, so the temporaries of
dead processes are removed by the next write to the same place. Finished files get the permissions
the user's umask gives a new file (temporary files are created private).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from littlebit.config import LittleBitError

_TMP_INFIX = ".tmp-"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_permissions(root: Path) -> None:
    """Give ``root`` and everything below it the permissions of a normally created file or directory."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            (Path(dirpath) / d).chmod(0o777 & ~mask)
        for f in filenames:
            (Path(dirpath) / f).chmod(0o666 & ~mask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(parent: Path, name: str) -> None:
    """Remove ``.NAME.tmp-PID-*`` left by processes that no longer run (a SIGKILL mid-write)."""
    pattern = re.compile(rf"^\.{re.escape(name)}{re.escape(_TMP_INFIX)}(\d+)-")
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def check_output_dir(out: Path) -> None:
    """Fail early, before any slow work, if ``out`` cannot become a new output directory."""
    check_writable_dir(out)
    if out.exists() and any(out.iterdir()):
        raise LittleBitError(f"output directory {out} exists and is not empty")


def check_writable_dir(out: Path) -> None:
    """Fail early if ``out`` is not a directory that exists or can be made, and written into."""
    if out.exists() and not out.is_dir():
        raise LittleBitError(f"output directory {out} is a file")
    existing = out if out.exists() else (out.parent if str(out.parent) else Path("."))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LittleBitError(f"cannot create {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LittleBitError(f"cannot write to {existing}: permission denied")


def make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; returns those created, deepest first."""
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
    return missing  # deepest first: the order to remove them in


def remove_empty(dirs: list[Path]) -> None:
    """Remove the directories of ``dirs`` that are empty, in order (deepest first)."""
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()


def os_error_message(e: OSError, what: str) -> str:
    reason = e.strerror or str(e) or type(e).__name__
    return f"cannot write {what}: {reason}"


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` when the block ends without an error."""
    out = Path(os.path.abspath(out_dir))  # "." and "dir/.." name no directory to replace
    check_output_dir(out)
    parent = out.parent
    created: list[Path] = []
    tmp: Path | None = None
    try:
        created = make_parents(parent)
        remove_stale_temporaries(parent, out.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP_INFIX}{os.getpid()}-", dir=parent))
        yield tmp
        share_permissions(tmp)
        if out.is_dir():
            out.rmdir()  # empty: checked above
        os.replace(tmp, out)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)
        if isinstance(e, OSError):
            raise LittleBitError(os_error_message(e, str(out))) from e
        raise
