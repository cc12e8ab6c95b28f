"""Writing files so that nothing partial is ever read as complete.

Every output is written under a temporary name in the same folder and renamed into place when it is
complete; a crash between the two leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temp_name(path: Path) -> Path:
    """A unique temporary sibling of ``path``; names start with '.tmp-' so readers skip them."""
    path = Path(path)
    return path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp(path: Path) -> bool:
    return Path(path).name.startswith(".tmp-")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is renamed to ``path``.

    Works for files and folders. On an exception the temporary is removed and ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            old = temp_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # e.g. a read-only folder, where nothing was made
                tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # A failed write() names no file; say which output did not fit, and where.
            raise OSError(exc.errno, f"{os.strerror(exc.errno)}: could not write {path} (the "
                          f"disk or quota of {path.parent} is full; the previous version of the "
                          "file, if any, is intact). Free space there and run the step again"
                          ) from exc
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc  # not the temp
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def set_aside(folder: Path) -> Path | None:
    """Rename ``folder`` to ``<folder>.<time>`` (never deleting anything); return the new path,
    or None when there was no such folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = folder.with_name(f"{folder.name}.{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.{stamp}-{n}")
    folder.rename(aside)
    return aside
