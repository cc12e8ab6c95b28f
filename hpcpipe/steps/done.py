"""Has a step already done this? One answer for ingest, features and the synthetic input.

Every step writes a small JSON record last (ingest's and features' ``manifest.json``, the synthetic
input's ``synth.json``), so its presence means the work before it finished. The record also says
what the work was computed from (``made_from`` and its ``fingerprint``, see
:mod:`hpcpipe.run.provenance`): the old output is still valid exactly when the fingerprint of what
the step would be computed from now is the recorded one. The caller keeps its own "already done"
log message; this module logs why a step is recomputed.

Imports nothing heavy (the standard library and hpcpipe's own small modules).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hpcpipe.files import read_json
from hpcpipe.run.provenance import changes, fingerprint

log = logging.getLogger(__name__)


def already_done(record: Path, made_from: Mapping[str, Any], files: Iterable[str] = (),
                 what: str = "the step") -> dict[str, Any] | None:
    """The JSON object in ``record`` if it says the same work is done, else None.

    ``made_from``: what the work would be computed from now; the record's ``fingerprint`` must
    be its fingerprint. ``files``: keys whose recorded values name files that must still exist.
    A record that is missing, unreadable or not an object means "not done" (a crash-safe writer
    never leaves a half-written one, but a person might). A record that exists but no longer
    matches is removed, so that the old output cannot look complete while it is redone; the log
    says what changed (``what`` names the step), or that an older record does not say what it
    was computed from (then the step is recomputed once, and records it).
    """
    record = Path(record)
    if not record.is_file():
        return None
    try:
        old = read_json(record)
    except (OSError, ValueError):
        old = None
    want = fingerprint(made_from)
    if not isinstance(old, dict):
        log.info("%s: %s is unreadable; recomputing", what, record)
    elif not isinstance(old.get("fingerprint"), str) or not isinstance(old.get("made_from"), dict):
        log.info("%s: %s does not record what it was computed from (written by an older "
                 "hpcpipe); recomputing once", what, record)
    elif old["fingerprint"] != want:
        log.info("%s must be recomputed: %s", what,
                 "; ".join(changes(what, old["made_from"], made_from)))
    elif not all(Path(old.get(key) or "").is_file() for key in files):
        log.info("%s: a file %s names is gone; recomputing", what, record)
    else:
        return old
    record.unlink(missing_ok=True)
    return None
