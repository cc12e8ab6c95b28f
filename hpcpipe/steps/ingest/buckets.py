"""Hash buckets: every product's rows in one bucket, spilled while reading, then finished.

Valid rows are appended to one spill file per hash bucket; the bucket count is estimated up front
(exact for parquet, sampled for JSON lines) and kept if the valid rows fill its buckets to
0.75-1.25x of ``target_bucket_rows``; only further off (many refused rows, a sample that misled)
is the spill redistributed once, to ``ceil(valid / target)`` buckets. The estimate for 3,000,000
rows came out 3,002,135: an exact rule would have rewritten the whole spill for 0.07%. Each bucket
is then sorted, deduplicated (:func:`~hpcpipe.steps.ingest.validation.sort_and_dedupe`) and
written (zstd). Every part of the input spills into its own folder and each bucket is finished as
a task of its own (:mod:`hpcpipe.steps.ingest.parts`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd  # type: ignore[import-untyped]
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from hpcpipe.files import write_json
from hpcpipe.steps.ingest.validation import sort_and_dedupe

OUTPUT_SCHEMA = pa.schema([
    ("parent_asin", pa.string()), ("asin", pa.string()), ("user_id", pa.string()),
    ("timestamp", pa.int64()), ("rating", pa.float32()), ("title", pa.string()),
    ("text", pa.string()), ("text_chars", pa.int32()), ("helpful_vote", pa.int32()),
    ("verified_purchase", pa.bool_()),
])
#: A review's own words, in the output only with ``ingest.keep_text``: the pipeline reads their
#: length (``text_chars``), and at full scale they are most of the bytes ingest would spill, sort
#: and compress.
TEXT_COLUMNS = ("title", "text")


def output_schema(keep_text: bool) -> pa.Schema:
    """The columns of ingest's output: :data:`OUTPUT_SCHEMA`, without :data:`TEXT_COLUMNS` unless
    ``keep_text``."""
    if keep_text:
        return OUTPUT_SCHEMA
    return pa.schema([f for f in OUTPUT_SCHEMA if f.name not in TEXT_COLUMNS])


def spill_schema(keep_text: bool) -> pa.Schema:
    """The output's columns plus ``_row``, a spilled row's place in the whole input."""
    return output_schema(keep_text).append(pa.field("_row", pa.int64()))


SPILL_SUFFIX = ".arrows"
#: Beside a spill's files, written when it is closed: the buckets it has a file for.
SPILLED = "buckets.json"
#: A chunk's rows of one bucket are few (a 16 MB block over 64 buckets: ~700 rows); they are
#: buffered and written together once this many bytes wait, in batches ~10x larger. Each batch
#: costs fixed work (as parquet row groups, the small ones cost a tenth of the ingest at 31.8M).
#: Without the text a row is ~90 bytes: 32 MB holds ~350k rows, ~5k a bucket at 64 buckets.
SPILL_BUFFER_BYTES = 32 << 20


def bucket_of(parent_asin: Any, n_buckets: int) -> np.ndarray:
    """Bucket number (int32, 0..n_buckets-1) of every parent_asin.

    The hash is pandas' SipHash of the UTF-8 bytes with its fixed default key, so it is the same in
    every process, run and machine. Accepts a pyarrow (Chunked)Array, numpy array, pandas Series or
    list of strings; nulls go to bucket 0.
    """
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be at least 1, got {n_buckets}")
    arr = parent_asin
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not isinstance(arr, pa.Array):
        arr = pa.array(np.asarray(arr, dtype=object), pa.string())
    if not pa.types.is_dictionary(arr.type):
        arr = arr.cast(pa.string()).dictionary_encode()
    # Hash each distinct value once: a column holds each product many times.
    values = np.asarray(arr.dictionary.to_pylist(), dtype=object)
    per_value = (pd.util.hash_array(values, categorize=False) % np.uint64(n_buckets))
    per_value = per_value.astype(np.int32)
    indices = arr.indices.fill_null(0).to_numpy(zero_copy_only=False)
    out = per_value[indices] if len(per_value) else np.zeros(len(arr), np.int32)
    if arr.null_count:
        out[~arr.is_valid().to_numpy(zero_copy_only=False)] = 0
    return out


def bucket_count(valid: int, guessed: int, target: int) -> int:
    """The guessed bucket count if its buckets hold 0.75-1.25x ``target`` rows on average, else
    ``ceil(valid / target)``."""
    exact = max(1, math.ceil(valid / target))
    return guessed if 0.75 * target <= valid / guessed <= 1.25 * target else exact


def spill_rows(t: pa.Table, rows: np.ndarray, keep_text: bool = False) -> pa.Table:
    """Valid rows in the output layout (:func:`spill_schema`), plus ``_row``: their place in the
    whole input. ``t`` has the review's text (``keep_text``) or only its length (``text_chars``)."""
    text = t.column("text") if "text" in t.column_names else None  # else its text_chars
    schema = spill_schema(keep_text)
    columns = {
        "parent_asin": t.column("parent_asin"),
        "asin": pc.coalesce(t.column("asin"), t.column("parent_asin")),
        "user_id": t.column("user_id"),
        "timestamp": t.column("timestamp"),
        "rating": t.column("rating").cast(pa.float32()),
        **({"title": t.column("title"), "text": text} if keep_text else {}),
        "text_chars": (t.column("text_chars") if text is None else pc.utf8_length(text).cast(
            pa.int32())).fill_null(0),
        "helpful_vote": t.column("helpful_vote").fill_null(0).cast(pa.int32()),
        "verified_purchase": t.column("verified_purchase").fill_null(False),
        "_row": pa.array(rows.astype(np.int64)),
    }
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


class Spill:
    """One Arrow IPC stream per bucket (columns ``schema``), appended to in batches of buffered
    rows: read back whole, once, soon. Uncompressed, unless it holds the reviews' words
    (``keep_text``): those are most of the bytes and compress well (lz4).

    Not parquet: a parquet writer keeps every row group's metadata in memory until it is closed,
    and with a bounded buffer the row groups get smaller as the buckets get more, so that memory
    grew with the square of the input (at 95.4M reviews, ~30 MB a worker by the end of a file).
    A stream keeps nothing per batch. Measured on 1.6M realistic rows at 191 buckets: written in
    0.45-0.49 s instead of 0.77-0.83 s, read back in 0.03 s instead of 0.22-0.28 s, the files 60%
    larger.
    """

    def __init__(self, folder: Path, n_buckets: int, schema: pa.Schema) -> None:
        self.schema = schema
        self.folder = folder / f"n{n_buckets}"
        self.folder.mkdir(parents=True)
        self.n_buckets = n_buckets
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self.options = pa.ipc.IpcWriteOptions(
            compression="lz4" if "text" in schema.names else None)
        self.pending: dict[int, list[pa.Table]] = {}
        self.pending_bytes = 0

    def path(self, b: int) -> Path:
        return self.folder / f"{b:05d}{SPILL_SUFFIX}"

    def add(self, table: pa.Table) -> None:
        """Spill ``table``'s rows to their buckets."""
        if self.n_buckets == 1:
            self.pending.setdefault(0, []).append(table)
        else:
            buckets = bucket_of(table.column("parent_asin"), self.n_buckets)
            if self.n_buckets <= np.iinfo(np.int16).max:
                # numpy sorts 16-bit integers stably by radix: 0.33 ms for a block's 26k rows
                # against 1.07 ms as int32.
                buckets = buckets.astype(np.int16)
            order = np.argsort(buckets, kind="stable")
            table = table.take(pa.array(order))
            bounds = np.searchsorted(buckets[order], np.arange(self.n_buckets + 1))
            for b in np.flatnonzero(np.diff(bounds)).tolist():  # the buckets it has rows of
                self.pending.setdefault(b, []).append(
                    table.slice(bounds[b], bounds[b + 1] - bounds[b]))
        # Counted once for the whole table: asking nbytes of every slice (11k times per 1.6M
        # rows at 191 buckets) was a fifth of the spill's time.
        self.pending_bytes += table.nbytes
        if self.pending_bytes >= SPILL_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write every bucket's buffered rows (input order kept within a bucket)."""
        for b, parts in sorted(self.pending.items()):
            w = self.writers.get(b)
            if w is None:
                w = self.writers[b] = pa.ipc.new_stream(
                    self.path(b), self.schema, options=self.options)
            w.write_table(pa.concat_tables(parts).combine_chunks())
        self.pending.clear()
        self.pending_bytes = 0

    def close(self) -> None:
        """Write what is buffered, close the files, and list the buckets that have one
        (:data:`SPILLED`): the bucket pass can then tell a bucket this spill has no rows of from
        one whose file is gone."""
        self.flush()
        for w in self.writers.values():
            w.close()
        write_json(self.folder / SPILLED, sorted(self.writers))
        self.writers.clear()


def read_spill(path: Path) -> pa.Table:
    """A spill file written by :class:`Spill`, whole."""
    with pa.OSFile(str(path)) as f, pa.ipc.open_stream(f) as reader:
        return reader.read_all()


def spill_batches(path: Path) -> Iterator[pa.Table]:
    """A spill file written by :class:`Spill`, one batch at a time."""
    with pa.OSFile(str(path)) as f, pa.ipc.open_stream(f) as reader:
        for batch in reader:
            yield pa.Table.from_batches([batch])


@dataclass
class BucketStats:
    """What one finished bucket holds."""

    rows: int
    duplicates: int
    min_timestamp: int
    max_timestamp: int


#: The columns with few distinct values in a bucket, dictionary-encoded in its file. The others
#: (user_id, timestamp, the words) are nearly unique per row: a dictionary was built for each only
#: to be given up. Writing a 475k-row bucket, medians of 12: 240 ms instead of 283 ms, the file 3%
#: smaller, read as fast.
DICTIONARY_COLUMNS = ("parent_asin", "asin", "rating", "text_chars", "helpful_vote",
                      "verified_purchase")


def write_bucket(table: pa.Table, path: Path) -> tuple[BucketStats, pa.Array]:
    """One bucket's spilled rows sorted, deduplicated and written to ``path`` (zstd); what it
    holds and its distinct products (from the sorted rows: no hash table)."""
    table, dups = sort_and_dedupe(table)
    table = table.drop_columns(["_row"])
    pq.write_table(table, path, compression="zstd", row_group_size=1 << 20,
                   use_dictionary=[c for c in DICTIONARY_COLUMNS if c in table.column_names])
    if table.num_rows == 0:
        return BucketStats(0, dups, 0, 0), pa.array([], pa.string())
    lo, hi = pc.min_max(table.column("timestamp")).values()
    parent = table.column("parent_asin").combine_chunks()
    return (BucketStats(table.num_rows, dups, lo.as_py(), hi.as_py()),
            parent.filter(pa.array(run_starts(parent))))


def run_starts(ordered: pa.Array) -> np.ndarray:
    """Where each run of equal values of the sorted ``ordered`` starts (bool per row): its
    distinct values without a hash table."""
    first = np.ones(len(ordered), bool)
    if len(ordered) > 1:
        first[1:] = pc.not_equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1)).to_numpy(
            zero_copy_only=False)
    return first
