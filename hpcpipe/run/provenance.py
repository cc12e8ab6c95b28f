"""What each step's output was computed from, and whether it still is.

Every step's completion record (ingest's and features' ``manifest.json``, the synthetic input's
``synth.json``) holds ``made_from``, what its output depends on, and ``fingerprint``, a short hash
of it:

- ingest: the input files (role, path, size, mtime_ns, a hash of their first and last 64 KiB) and
  the settings that change its output;
- features: ingest's fingerprint, the data set's last week and the settings that change its
  output (none today: cpus, memory, time and workers never do);
- the synthetic input: the request (size, products, seed, format).

A step compares the fingerprint of what it would be computed from now with the recorded one
(``hpcpipe.steps.done.already_done``) and says what changed (:func:`changes`) when they differ.
``hpcpipe status`` and ``summarize`` ask :func:`out_of_date`, which reads the small JSON records
only and stats the input files, so it stays fast. Standard library only: watch imports this.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hpcpipe.run.layout import RunLayout

#: The steps whose records say what they were computed from, in pipeline order: step -> (its
#: record in the run folder, the upstream step whose fingerprint it records, if any).
RECORDS: dict[str, tuple[str, str | None]] = {
    "ingest": ("ingest/manifest.json", None),
    "features": ("features/manifest.json", "ingest"),
}

OLD_RECORD = "inputs not recorded (older hpcpipe): recomputed when rerun"


def fingerprint(made_from: Mapping[str, Any]) -> str:
    """A short hash of ``made_from`` (JSON, keys sorted): equal exactly when the inputs are."""
    text = json.dumps(made_from, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def identity(record: Mapping[str, Any]) -> str:
    """The fingerprint a downstream step records for this upstream record.

    A record written before fingerprints existed has none: its whole content (which changes
    every time the step runs, if only in ``seconds``) stands in for it.
    """
    fp = record.get("fingerprint")
    return fp if isinstance(fp, str) else "record-" + fingerprint(record)


def changes(step: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two ``made_from``, in the user's words, e.g. "input /d/r.jsonl
    changed: size 5710 -> 7620", "ingest output changed since features ran"."""
    out: list[str] = []
    for key in sorted(set(old) | set(new), key=lambda k: (k != "inputs", k)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "inputs" and isinstance(a, list) and isinstance(b, list):
            out += _input_changes(a, b)
        elif key in RECORDS:
            out.append(f"{key} output changed since {step} ran")
        elif isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"{k} changed: {_show(a.get(k))} -> {_show(b.get(k))}"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            out.append(f"{key} changed: {_show(a)} -> {_show(b)}")
    return out or ["what it is computed from changed"]


def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(value)


def _input_changes(old: Sequence[Any], new: Sequence[Any]) -> list[str]:
    def by_file(items: Sequence[Any]) -> dict[tuple[Any, Any], dict[str, Any]]:
        return {(i.get("role"), i.get("path")): i for i in items if isinstance(i, dict)}

    a, b = by_file(old), by_file(new)
    out = [f"input {path} ({role}) is new" for role, path in b if (role, path) not in a]
    out += [f"input {path} ({role}) is no longer used" for role, path in a if (role, path) not in b]
    for (role, path), x in a.items():
        y = b.get((role, path))
        if y is None or x == y:
            continue
        if x.get("bytes") != y.get("bytes"):
            out.append(f"input {path} changed: size {x.get('bytes')} -> {y.get('bytes')}")
        elif x.get("mtime_ns") != y.get("mtime_ns"):
            out.append(f"input {path} changed: modified again (same size)")
        else:
            out.append(f"input {path} changed: content (same size and modification time)")
    if not out and list(a) != list(b):
        out.append("the order of the input files changed")  # "first kept" follows input order
    return out


# ---------------------------------------------------------------------------------------------
# What status and summarize show.


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable or damaged: nothing to compare
        return None
    return record if isinstance(record, dict) else None


def _inputs_changed(made_from: Mapping[str, Any]) -> str | None:
    """Why the input files no longer match the record (a stat each, no reading), or None."""
    for item in made_from.get("inputs") or ():
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            continue
        name = Path(item["path"]).name
        try:
            st = os.stat(item["path"])
        except FileNotFoundError:
            return f"input {name} is gone"
        except OSError:
            continue
        if (st.st_size, st.st_mtime_ns) != (item.get("bytes"), item.get("mtime_ns")):
            return f"out of date: input {name} changed since"
    return None


def out_of_date(layout: RunLayout) -> dict[str, str]:
    """{step: why its recorded output no longer matches what it would be computed from now},
    for the steps that have a record and do not match. Reads the records only; never raises."""
    records = {step: _read(layout.root / rel) for step, (rel, _) in RECORDS.items()}
    found: dict[str, str] = {}
    for step, (_, upstream) in RECORDS.items():
        record = records[step]
        if record is None:
            continue
        made_from = record.get("made_from")
        if not isinstance(made_from, dict) or not isinstance(record.get("fingerprint"), str):
            found[step] = OLD_RECORD
            continue
        if upstream is None:
            why = _inputs_changed(made_from)
            if why is not None:
                found[step] = why
            continue
        up = records.get(upstream)
        if up is None:
            found[step] = f"out of date: {upstream}'s output is gone or being rebuilt"
        elif made_from.get(upstream) != identity(up):
            found[step] = f"out of date: {upstream} ran again since"
        elif found.get(upstream, "").startswith("out of date"):
            found[step] = f"out of date: {upstream} is out of date"
    return found
