"""Has a step already done this? One answer for ingest, features and the synthetic input.

Every step writes a small JSON record last (ingest's and features' ``manifest.json``, the synthetic
input's ``synth.json``), so its presence means the work before it finished. What makes the old
record still valid differs by step (the same inputs and settings, the same request, files that
must still exist); the caller says which, and keeps its own log message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hpcpipe.files import read_json


def already_done(record: Path, expect: Mapping[str, Any] | None = None,
                 files: Iterable[str] = ()) -> dict[str, Any] | None:
    """The JSON object in ``record`` if it says the same work is done, else None.

    ``expect``: keys whose recorded values must equal these. ``files``: keys whose recorded values
    name files that must still exist. A record that is missing, unreadable or not an object means
    "not done" (a crash-safe writer never leaves a half-written one, but a person might).
    """
    if not Path(record).is_file():
        return None
    try:
        old = read_json(record)
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict):
        return None
    if any(old.get(key) != value for key, value in (expect or {}).items()):
        return None
    if not all(Path(old.get(key) or "").is_file() for key in files):
        return None
    return old
