"""Checks on the reviews: which rows are refused and why, whole-input checks, duplicates.

Checks on values (ranges, timestamps, required fields) are vectorized over a chunk. Refused rows
go to ``quarantine.jsonl`` with their file, line (1-based; for parquet the 0-based row index),
reason and raw text. Duplicates (user_id, parent_asin, timestamp) are dropped from a bucket sorted
by (parent_asin, timestamp), keeping the first in input order.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]

from hpcpipe.errors import InputError
from hpcpipe.files import temp_name
from hpcpipe.steps.ingest.reading import RAW_CHARS, REQUIRED, Chunk

#: Seconds since 1990 up to now: a timestamp in this range (as seconds) is not milliseconds.
_SECONDS_FLOOR = 631_152_000
_MS_FLOOR = 100_000_000_000  # 1973-03-03 in ms: nothing earlier is a plausible review time
REASON_SECONDS = "timestamp looks like seconds, not milliseconds"
_MIN_METADATA_COVERAGE = 0.5


class Quarantine:
    """Refused rows, one JSON object a line, in a temporary file until the ingest ends.

    Used as a context manager: on success the file is renamed to ``path``; on an
    :class:`InputError` with refused rows too (shown to the person fixing the input; without a
    manifest nothing reads it as done); on any other failure it is removed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = temp_name(path)
        self.file = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115 (closed in __exit__)
        self.reasons: Counter[str] = Counter()

    def add(self, source: str, line: int, reason: str, raw: str) -> None:
        self.reasons[reason] += 1
        self.file.write(json.dumps({"source": source, "line": int(line), "reason": reason,
                                    "raw": raw[:RAW_CHARS]}) + "\n")

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def __enter__(self) -> Quarantine:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.file.close()
        if exc is None or (isinstance(exc, InputError) and self.count):
            os.replace(self.tmp, self.path)
        self.tmp.unlink(missing_ok=True)


@dataclass
class Good:
    table: pa.Table
    mask: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.table.num_rows



def validate(chunk: Chunk, now_ms: int, quarantine: Quarantine) -> tuple[Good, int, int]:
    """Rows of ``chunk`` that pass; the others go to quarantine. Also returns how many rows had
    a seconds-like timestamp and how many had a usable timestamp at all (for the whole-file
    check)."""
    t = chunk.table
    n = t.num_rows
    reason = np.zeros(n, dtype=np.int8)
    reasons = ["", REASON_SECONDS]

    def mark(mask: np.ndarray, text: str) -> None:
        if text not in reasons:
            reasons.append(text)
        code = reasons.index(text)
        reason[(reason == 0) & mask] = code

    def np_of(col: str, fill: Any) -> np.ndarray:
        return t.column(col).fill_null(fill).to_numpy()

    if chunk.pre_reason is not None:
        for text in {r for r in chunk.pre_reason if r is not None}:
            mark(chunk.pre_reason == text, text)
    for col in REQUIRED:
        c = t.column(col)
        missing = c.is_null().to_numpy(zero_copy_only=False)
        if pa.types.is_string(c.type):
            missing |= (pc.utf8_length(c.fill_null("")).to_numpy() == 0)
        mark(missing, f"missing required field: {col}")
    rating = np_of("rating", 3.0)
    mark(np.isnan(rating), "rating is not a number")
    mark((rating < 1) | (rating > 5), "rating out of range [1, 5]")
    ts = np_of("timestamp", _MS_FLOOR)
    has_ts = (reason == 0) & (ts >= 0)
    mark(ts < 0, "timestamp is negative")
    seconds_like = (ts < _MS_FLOOR) & (ts >= _SECONDS_FLOOR) & (ts * 1000 <= now_ms)
    mark(seconds_like, REASON_SECONDS)
    mark(ts < _MS_FLOOR, "timestamp before 1973: not milliseconds since 1970")
    mark(ts > now_ms, "timestamp is in the future")

    bad = np.flatnonzero(reason)
    for i in bad:
        quarantine.add(chunk.source, int(chunk.lines[i]), reasons[reason[i]], chunk.raws(int(i)))
    mask = reason == 0
    n_seconds = int((has_ts & seconds_like & (reason == 1)).sum())
    good = t if len(bad) == 0 else t.filter(pa.array(mask))
    return Good(good, mask), n_seconds, int(has_ts.sum())



def check_timestamp_unit(path: Path, seconds_like: int, with_timestamp: int) -> None:
    """Refuse a file whose every usable timestamp is in seconds: a wrong unit, not bad rows."""
    if with_timestamp and seconds_like == with_timestamp:
        raise InputError(
            f"{path}: every timestamp looks like seconds since 1970, not milliseconds "
            "(the Amazon Reviews'23 layout uses ms). Convert the file (timestamp * 1000) "
            "and run again")


def check_some_valid(reviews: Sequence[Path], rows_in: int, valid: int,
                     quarantine: Quarantine) -> None:
    """Refuse an input with no rows, or none that passed the checks."""
    if rows_in == 0:
        raise InputError(
            f"no reviews in {', '.join(map(str, reviews))}: the input is empty (no "
            "lines or rows, only blank lines at most). Check that data.reviews names the right "
            "file and that it was written completely")
    if valid == 0:
        raise InputError(
            f"no valid reviews in {', '.join(map(str, reviews))}: {rows_in} rows read, "
            f"{quarantine.count} refused ({_top_reasons(quarantine.reasons)}). See "
            f"{quarantine.path} for the refused rows and fix the input")


def check_coverage(products: pa.Array, meta_ids: pa.ChunkedArray, reviews: Path,
                   metadata: Path) -> None:
    """Refuse metadata that lacks most reviewed products: it belongs to other reviews."""
    found = pc.sum(pc.is_in(products, value_set=meta_ids)).as_py() or 0
    share = found / max(1, len(products))
    if share < _MIN_METADATA_COVERAGE:
        raise InputError(
            f"metadata {metadata} does not match reviews {reviews}: only {found} of "
            f"{len(products)} reviewed products ({share:.0%}) are in it. Give the metadata file "
            "of the same category/dump as the reviews")


def _top_reasons(reasons: Counter[str]) -> str:
    return "; ".join(f"{n} {r}" for r, n in reasons.most_common(3)) or "none"


def sort_and_dedupe(table: pa.Table) -> tuple[pa.Table, int]:
    """``table`` (one bucket, with the input order in ``_row``) sorted by (parent_asin,
    timestamp), without duplicates (user_id, parent_asin, timestamp) but the first in input order;
    and how many were dropped."""
    n = table.num_rows
    dups = 0
    if n:
        order = pc.sort_indices(table, sort_keys=[
            ("parent_asin", "ascending"), ("timestamp", "ascending"),
            ("user_id", "ascending"), ("_row", "ascending")])
        table = table.take(order)
        if n > 1:
            same = np.ones(n - 1, dtype=bool)
            for col in ("parent_asin", "timestamp", "user_id"):
                c = table.column(col)
                same &= pc.equal(c.slice(1), c.slice(0, n - 1)).to_numpy(zero_copy_only=False)
            if same.any():
                keep = np.concatenate([[True], ~same])
                dups = int(n - keep.sum())
                table = table.filter(pa.array(keep))
    return table, dups
