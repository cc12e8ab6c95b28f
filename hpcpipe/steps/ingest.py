"""The ingest step: raw reviews + product metadata -> validated, deduplicated, bucketed parquet.

Output (see docs/contracts.md, "Ingest output"): ``reviews/bucket=NNNNN/part-0.parquet``,
``products.parquet``, ``quarantine.jsonl`` and, written last, ``manifest.json``.

How it runs, in bounded memory:

1. Product metadata is read (only parent_asin, title, main_category, store).
2. Reviews are streamed in blocks (~32 MB of JSON lines, or ~1M parquet rows). A JSON block goes
   through ``pyarrow.json`` in one call; only a block that fails is split in halves until the bad
   lines are isolated, so one bad line costs a few re-parses of its neighbourhood, not a Python loop
   over the file. Checks on values (ranges, timestamps, required fields) are vectorized. Refused
   rows go to ``quarantine.jsonl`` with their file, line (1-based; for parquet the 0-based row
   index), reason and raw text.
3. Valid rows are appended to one spill file per hash bucket; the bucket count is estimated up front
   (exact for parquet, sampled for JSON lines) and kept if the valid rows fill its buckets to
   0.75-1.25x of ``target_bucket_rows``; only further off (many refused rows, a sample that misled)
   is the spill redistributed once, to ``ceil(valid / target)`` buckets. The estimate for 3,000,000
   rows came out 3,002,135: an exact rule would have rewritten the whole spill for 0.07%.
4. Each bucket is sorted by (parent_asin, timestamp), duplicates (user_id, parent_asin, timestamp)
   are dropped keeping the first in input order, and the bucket is written (zstd), two at a time.

The reviews folder is built under a temporary name and renamed; ``manifest.json`` comes last, so a
crash never leaves output that looks complete. A manifest for the same inputs means "already done".
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import os
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq
from isal import igzip, isal_zlib

from hpcpipe.config import DataConfig, IngestConfig, RunConfig
from hpcpipe.errors import InputError
from hpcpipe.files import atomic_path, read_json, temp_name, write_json
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.metrics import MetricsWriter
from hpcpipe.runtime.env import JobEnvironment

log = logging.getLogger(__name__)

REQUIRED: tuple[str, ...] = ("rating", "parent_asin", "user_id", "timestamp")
READ_SCHEMA = pa.schema([
    ("rating", pa.float64()), ("title", pa.string()), ("text", pa.string()),
    ("asin", pa.string()), ("parent_asin", pa.string()), ("user_id", pa.string()),
    ("timestamp", pa.int64()), ("helpful_vote", pa.int64()), ("verified_purchase", pa.bool_()),
])
OUTPUT_SCHEMA = pa.schema([
    ("parent_asin", pa.string()), ("asin", pa.string()), ("user_id", pa.string()),
    ("timestamp", pa.int64()), ("rating", pa.float32()), ("title", pa.string()),
    ("text", pa.string()), ("text_chars", pa.int32()), ("helpful_vote", pa.int32()),
    ("verified_purchase", pa.bool_()),
])
META_SCHEMA = pa.schema([("parent_asin", pa.string()), ("title", pa.string()),
                         ("main_category", pa.string()), ("store", pa.string())])
_SPILL_SCHEMA = OUTPUT_SCHEMA.append(pa.field("_row", pa.int64()))

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
BLOCK_BYTES = 32 << 20
PARQUET_BATCH_ROWS = 1 << 20
_SPILL_COMPRESSION = "lz4"  # spill is read back once, soon: cheap to write and read
#: A chunk's rows of one bucket are few (a 32 MB block over 64 buckets: ~1,500 rows); they are
#: buffered and written together once this many bytes wait, in row groups ~10x larger. Each
#: row group costs fixed work, and at 31.8M reviews the small ones cost a tenth of the ingest.
SPILL_BUFFER_BYTES = 256 << 20
RAW_CHARS = 500
#: Seconds since 1990 up to now: a timestamp in this range (as seconds) is not milliseconds.
_SECONDS_FLOOR = 631_152_000
_MS_FLOOR = 100_000_000_000  # 1973-03-03 in ms: nothing earlier is a plausible review time
REASON_SECONDS = "timestamp looks like seconds, not milliseconds"
_MIN_METADATA_COVERAGE = 0.5


def run(layout: RunLayout, cfg: RunConfig, metrics: MetricsWriter,
        env: JobEnvironment | None = None) -> dict[str, Any]:
    """The ingest step of a run: synthesize into ``layout.raw`` when ``cfg.data.reviews`` is empty
    (reusing a complete earlier synthesis of the same size and seed), then :func:`ingest` into
    ``layout.ingest``. Returns the ingest manifest (plus ``"skipped": True`` if already done)."""
    if cfg.data.reviews:
        if not cfg.data.metadata:
            raise InputError("data.metadata is not set: ingest needs the product metadata file "
                             "that goes with data.reviews; set data.metadata=PATH")
        reviews = [Path(p) for p in cfg.data.reviews]
        metadata = Path(cfg.data.metadata)
    else:
        made = synthesize_once(layout.raw, cfg.data)
        reviews, metadata = [Path(made["reviews"])], Path(made["metadata"])
    return ingest(reviews, metadata, layout.ingest, cfg.ingest, metrics)


def synthesize_once(raw_dir: Path, data: DataConfig) -> dict[str, Any]:
    """Synthetic input in ``raw_dir`` for ``data`` (synth_reviews, synth_products, seed), made once.

    A marker ``raw_dir/synth.json`` (written after both files) records what was made; if it
    matches and the files exist, they are reused. Returns the dict of ``synth.write_synthetic``.
    """
    from hpcpipe.steps import synth

    raw_dir = Path(raw_dir)
    marker = raw_dir / "synth.json"
    want = {"n_reviews": data.synth_reviews, "n_products": data.synth_products,
            "seed": data.seed, "format": "jsonl.gz"}
    if marker.is_file():
        try:
            done = read_json(marker)
        except (OSError, ValueError):
            done = {}
        if done.get("request") == want and all(Path(done.get(k, "")).is_file()
                                                 for k in ("reviews", "metadata")):
            log.info("reusing synthetic input in %s (%d reviews, seed %d)", raw_dir,
                     data.synth_reviews, data.seed)
            return done
    log.info("no input configured: synthesizing %d reviews (seed %d) into %s",
             data.synth_reviews, data.seed, raw_dir)
    made = synth.write_synthetic(raw_dir, data.synth_reviews, seed=data.seed,
                                 n_products=data.synth_products, fmt="jsonl.gz")
    made["request"] = want
    write_json(marker, made)
    return made


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


# ---------------------------------------------------------------------------------------------
# The ingest itself.


class _Quarantine:
    """Refused rows, one JSON object a line, written to a temporary file until the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in finish/abort)
        self.reasons: Counter = Counter()

    def add(self, source: str, line: int, reason: str, raw: str) -> None:
        self.reasons[reason] += 1
        self.file.write(json.dumps({"source": source, "line": int(line), "reason": reason,
                                    "raw": raw[:RAW_CHARS]}) + "\n")

    @property
    def count(self) -> int:
        return sum(self.reasons.values())


def ingest(reviews_paths: Sequence[Path | str], metadata_path: Path | str | None,
           out_dir: Path, cfg: IngestConfig, metrics: MetricsWriter | None = None
           ) -> dict[str, Any]:
    """Validate, deduplicate and bucket the reviews into ``out_dir`` (the contract's ``ingest/``).

    ``reviews_paths``: JSON lines (``.jsonl``/``.json``/``.ndjson``, optionally ``.gz``) or
    ``.parquet`` files. ``metadata_path``: the product metadata in the same formats. Returns the
    manifest dict (also written to ``out_dir/manifest.json``); if a manifest for the same inputs
    and ``target_bucket_rows`` already exists, nothing is redone and it is returned with
    ``"skipped": True``. Raises :class:`InputError` for input that cannot be used as a whole
    (missing or unreadable file, truncated gzip/parquet, unknown extension, no valid rows, a whole
    file of second timestamps, metadata that does not match the reviews).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    reviews_paths = [Path(p) for p in reviews_paths]
    if not reviews_paths:
        raise InputError("no reviews files given; set data.reviews to one or more files")
    if metadata_path is None:
        raise InputError("no product metadata file given; set data.metadata=PATH")
    metadata_path = Path(metadata_path)
    for p in [*reviews_paths, metadata_path]:
        _check_input_path(p)
    inputs = [_describe(p, "reviews") for p in reviews_paths] + [_describe(metadata_path,
                                                                           "metadata")]
    settings = {"target_bucket_rows": cfg.target_bucket_rows}
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file():
        try:
            old = read_json(manifest_path)
        except (OSError, ValueError):
            old = {}
        if old.get("inputs") == inputs and old.get("settings") == settings:
            log.info("ingest already done for these inputs (%s); skipping", manifest_path)
            old["skipped"] = True
            if metrics is not None:
                metrics.write("summary", **{k: old.get(k) for k in (
                    "rows_in", "rows_out", "quarantined", "duplicates", "n_buckets")},
                    seconds=0.0, rows_per_s=0.0, skipped=True)
            return old
        manifest_path.unlink()  # the old output no longer matches: it must not look complete
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".tmp-*"):  # left by a run that was killed
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()

    meta = _read_metadata(metadata_path)
    meta_ids = meta.column("parent_asin")
    now_ms = int(time.time() * 1000) + cfg.future_tolerance_days * 86_400_000
    estimate = sum(_estimate_rows(p) for p in reviews_paths)
    n_guess = max(1, math.ceil(estimate / cfg.target_bucket_rows))
    log.info("reading %d reviews file(s), about %d rows -> %d bucket(s) expected",
             len(reviews_paths), estimate, n_guess)

    spill_dir = temp_name(out_dir / "spill")
    spill_dir.mkdir()
    quarantine_tmp = temp_name(out_dir / "quarantine.jsonl")
    quarantine = _Quarantine(quarantine_tmp)
    try:
        spill = _Spill(spill_dir, n_guess)
        rows_in = 0
        valid = 0
        product_parts: list[pa.Array] = []
        checked_coverage = False
        for path in reviews_paths:
            file_rows = file_seconds = file_ts = 0
            for chunk in _read_reviews(path):
                for line, reason, raw in chunk.refused:
                    quarantine.add(str(path), line, reason, raw)
                rows_in += chunk.table.num_rows + len(chunk.refused)
                file_rows += chunk.table.num_rows + len(chunk.refused)
                good, n_seconds, n_ts = _validate(chunk, now_ms, quarantine)
                file_seconds += n_seconds
                file_ts += n_ts
                if good.num_rows == 0:
                    continue
                # Input order across all files, so that "first kept" means first in the input.
                order = rows_in - chunk.table.num_rows - len(chunk.refused) + np.flatnonzero(
                    good.mask)
                good = _to_output(good.table, order)
                uniq = pc.unique(good.column("parent_asin"))
                product_parts.append(uniq)
                if len(product_parts) > 16:  # keep the distinct products compact
                    product_parts = [pc.unique(pa.chunked_array(product_parts).combine_chunks())]
                if not checked_coverage and len(uniq) >= 50:
                    _check_coverage(uniq, meta_ids, path, metadata_path)
                    checked_coverage = True
                spill.add(good)
                valid += good.num_rows
            if file_ts and file_seconds == file_ts:
                raise InputError(
                    f"{path}: every timestamp looks like seconds since 1970, not milliseconds "
                    "(the Amazon Reviews'23 layout uses ms). Convert the file (timestamp * 1000) "
                    "and run again")
            log.info("%s: %d rows read", path, file_rows)
        spill.close()
        log.info("read and checked %d rows in %.1f s", rows_in, time.perf_counter() - start)
        if rows_in == 0:
            raise InputError(
                f"no reviews in {', '.join(map(str, reviews_paths))}: the input is empty (no "
                "lines or rows, only blank lines at most). Check that data.reviews names the right "
                "file and that it was written completely")
        if valid == 0:
            raise InputError(
                f"no valid reviews in {', '.join(map(str, reviews_paths))}: {rows_in} rows read, "
                f"{quarantine.count} refused ({_top_reasons(quarantine.reasons)}). See "
                f"{out_dir / 'quarantine.jsonl'} for the refused rows and fix the input")
        products = pc.unique(pa.chunked_array(product_parts, pa.string()).combine_chunks())
        _check_coverage(products, meta_ids, reviews_paths[0], metadata_path)

        n_buckets = _bucket_count(valid, spill.n_buckets, cfg.target_bucket_rows)
        if n_buckets != spill.n_buckets:
            log.info("%d valid rows need %d buckets, not the %d estimated: redistributing",
                     valid, n_buckets, spill.n_buckets)
            spill = spill.regroup(n_buckets)
        reviews_dir = out_dir / "reviews"
        with atomic_path(reviews_dir) as tmp_reviews:
            tmp_reviews.mkdir()
            stats = _finish_buckets(spill, tmp_reviews)
        log.info("sorted and wrote %d buckets; %.1f s so far", n_buckets,
                 time.perf_counter() - start)
        rows_out = sum(s[0] for s in stats)
        duplicates = sum(s[1] for s in stats)
        min_ts = min(s[2] for s in stats if s[0])
        max_ts = max(s[3] for s in stats if s[0])

        missing = _write_products(out_dir / "products.parquet", meta, products)
        quarantine.file.close()
        os.replace(quarantine_tmp, out_dir / "quarantine.jsonl")
    except BaseException as exc:
        quarantine.file.close()
        if isinstance(exc, InputError) and quarantine.count:
            # Shown to the person fixing the input; without a manifest nothing reads it as done.
            os.replace(quarantine_tmp, out_dir / "quarantine.jsonl")
        quarantine_tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)

    seconds = time.perf_counter() - start
    max_day = datetime.fromtimestamp(max_ts / 1000, UTC).date()
    manifest = {
        "n_buckets": n_buckets, "rows_in": rows_in, "rows_out": rows_out,
        "quarantined": quarantine.count, "duplicates": duplicates,
        "reasons": dict(sorted(quarantine.reasons.items())),
        "min_timestamp": int(min_ts), "max_timestamp": int(max_ts),
        "last_week": (max_day - timedelta(days=max_day.weekday())).isoformat(),
        "products": len(products), "products_without_metadata": missing,
        "seconds": round(seconds, 3), "rows_per_s": round(rows_in / max(seconds, 1e-9), 1),
        "inputs": inputs, "settings": settings,
    }
    assert rows_in == rows_out + manifest["quarantined"] + duplicates, manifest
    write_json(manifest_path, manifest)
    log.info("ingest: %d rows in, %d out, %d quarantined, %d duplicates, %d buckets, %.1f s "
             "(%.0f rows/s)", rows_in, rows_out, quarantine.count, duplicates, n_buckets, seconds,
             manifest["rows_per_s"])
    for reason, count in sorted(quarantine.reasons.items(), key=lambda kv: -kv[1]):
        log.info("quarantined %d: %s", count, reason)
    if missing:
        log.warning("%d products (of %d) have no metadata in %s; their reviews are kept",
                    missing, len(products), metadata_path)
    if metrics is not None:
        metrics.write("summary", rows_in=rows_in, rows_out=rows_out,
                      quarantined=quarantine.count, duplicates=duplicates, n_buckets=n_buckets,
                      seconds=round(seconds, 3), rows_per_s=manifest["rows_per_s"],
                      reasons=manifest["reasons"], products_without_metadata=missing)
    return manifest


# ---------------------------------------------------------------------------------------------
# Inputs as a whole.


def _kind(path: Path) -> tuple[str, bool]:
    """("json" or "parquet", gzipped?) from the file name."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if name.endswith(".parquet") and not gz:
        return "parquet", False
    if name.endswith(JSON_SUFFIXES):
        return "json", gz
    raise InputError(
        f"{path}: unknown file type; use JSON lines (.jsonl, .json, .ndjson, optionally .gz) or "
        ".parquet, and name the file accordingly")


def _check_input_path(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path} does not exist; check data.reviews / data.metadata")
    if not path.is_file():
        raise InputError(f"{path} is not a file; give the file itself, not a folder")
    _kind(path)


def _describe(path: Path, role: str) -> dict[str, Any]:
    st = path.stat()
    return {"role": role, "path": str(path.resolve()), "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns}


def _truncated(path: Path, exc: BaseException) -> InputError:
    return InputError(
        f"{path} is truncated or corrupt: the gzip stream ends early or is damaged ({exc}). "
        "The file was probably cut short while copying or downloading; fetch it again")


def _bad_parquet(path: Path, exc: BaseException) -> InputError:
    return InputError(
        f"{path} is not a readable parquet file (truncated or corrupt: {exc}). Copy or export it "
        "again")


def _open_json(path: Path) -> io.BufferedIOBase:
    _, gz = _kind(path)
    if gz:
        # ISA-L's inflate: the same gzip format and errors, 2-3x the speed of zlib's.
        return igzip.IGzipFile(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115 (the caller closes it)


def _bucket_count(valid: int, guessed: int, target: int) -> int:
    """The guessed bucket count if its buckets hold 0.75-1.25x ``target`` rows on average, else
    ``ceil(valid / target)``."""
    exact = max(1, math.ceil(valid / target))
    return guessed if 0.75 * target <= valid / guessed <= 1.25 * target else exact


def _estimate_rows(path: Path) -> int:
    """Rows in a reviews file: exact for parquet, from a 4 MB sample for JSON lines."""
    kind, gz = _kind(path)
    if kind == "parquet":
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise _bad_parquet(path, exc) from None
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4 << 20 if not gz else 1 << 20)
    if gz:
        d = zlib.decompressobj(wbits=31)
        try:
            data = d.decompress(head, 64 << 20)
        except zlib.error as exc:
            raise _truncated(path, exc) from None
        used = len(head) - len(d.unused_data) - len(d.unconsumed_tail)
        ratio = len(data) / max(1, used)
        head, size = data, int(size * ratio)
    lines = max(1, head.count(b"\n"))
    return max(1, round(size * lines / max(1, len(head))))


def _read_metadata(path: Path) -> pa.Table:
    """parent_asin, title, main_category, store of every product, first row per parent_asin."""
    kind, _ = _kind(path)
    if kind == "parquet":
        try:
            pf = pq.ParquetFile(path)
            names = set(pf.schema_arrow.names)
            if "parent_asin" not in names:
                raise InputError(
                    f"metadata file {path} has no parent_asin column (columns: "
                    f"{', '.join(sorted(names)[:12])}); is it the product metadata file "
                    "(meta_*.jsonl / .parquet) that goes with the reviews?")
            cols = [c for c in META_SCHEMA.names if c in names]
            table = pf.read(columns=cols)
        except (pa.ArrowException, OSError) as exc:
            raise _bad_parquet(path, exc) from None
        table = _conform(table, META_SCHEMA)
    else:
        parts = []
        bad = 0
        for block, _, _ in _json_blocks(path):
            t, refused = _parse_json_block(block, META_SCHEMA)
            bad += len(refused)
            parts.append(t.table)
        table = pa.concat_tables(parts) if parts else META_SCHEMA.empty_table()
        if bad:
            log.warning("metadata %s: %d unreadable lines skipped", path, bad)
        if table.num_rows and table.column("parent_asin").null_count == table.num_rows:
            raise InputError(
                f"metadata file {path} has no parent_asin field; is it the product metadata "
                "file (meta_*.jsonl) that goes with the reviews?")
    table = table.filter(pc.is_valid(table.column("parent_asin")))
    if table.num_rows == 0:
        raise InputError(f"metadata file {path} has no products; give the metadata file that "
                         "goes with the reviews")
    _, first = np.unique(table.column("parent_asin").to_numpy(zero_copy_only=False),
                         return_index=True)
    return table.take(pa.array(np.sort(first)))


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: absent ones null, others cast."""
    cols = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            cols.append(col if col.type == field.type else col.cast(field.type))
        else:
            cols.append(pa.nulls(table.num_rows, field.type))
    return pa.table(cols, schema=schema)


def _check_coverage(products: pa.Array, meta_ids: pa.ChunkedArray, reviews: Path,
                    metadata: Path) -> None:
    found = pc.sum(pc.is_in(products, value_set=meta_ids)).as_py() or 0
    share = found / max(1, len(products))
    if share < _MIN_METADATA_COVERAGE:
        raise InputError(
            f"metadata {metadata} does not match reviews {reviews}: only {found} of "
            f"{len(products)} reviewed products ({share:.0%}) are in it. Give the metadata file "
            "of the same category/dump as the reviews")


def _top_reasons(reasons: Counter) -> str:
    return "; ".join(f"{n} {r}" for r, n in reasons.most_common(3)) or "none"


# ---------------------------------------------------------------------------------------------
# Reading reviews in chunks.


@dataclass
class _Chunk:
    """Parsed rows of one block/batch. ``table`` has READ_SCHEMA; row i came from ``lines[i]``."""

    table: pa.Table
    source: str
    lines: np.ndarray  # line number (JSON, 1-based) or row index (parquet) of each row
    raws: Any  # callable(i) -> raw text of row i
    refused: list[tuple[int, str, str]]  # (line, reason, raw) of lines the parser refused
    pre_reason: np.ndarray | None = None  # per-row reason found while coercing types, or None


@dataclass
class _Good:
    table: pa.Table
    mask: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def _read_reviews(path: Path) -> Iterator[_Chunk]:
    """Chunks of a reviews file; the next one is read and parsed in a thread meanwhile."""
    return _prefetched(_read_reviews_here(path))


def _prefetched(chunks: Iterator[_Chunk]) -> Iterator[_Chunk]:
    # Reading/parsing (Arrow, GIL released) of chunk k+1 overlaps checking and spilling chunk k.
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(next, chunks, None)
        while True:
            chunk = nxt.result()
            if chunk is None:
                return
            nxt = pool.submit(next, chunks, None)
            yield chunk


def _read_reviews_here(path: Path) -> Iterator[_Chunk]:
    kind, _ = _kind(path)
    if kind == "parquet":
        yield from _read_parquet_reviews(path)
        return
    for block, first_line, at_eof in _json_blocks(path):
        parsed, refused = _parse_json_block(block, READ_SCHEMA, at_eof)
        refused = [(first_line + line, reason, raw) for line, reason, raw in refused]
        lines = first_line + parsed.line_index
        yield _Chunk(parsed.table, str(path), lines, _json_raws(block, parsed), refused)


def _json_blocks(path: Path) -> Iterator[tuple[bytes, int, bool]]:
    """(bytes of whole lines, line number of the first, is the file's end) of ~BLOCK_BYTES each;
    the next block is read (and decompressed) in a thread while the caller works on this one."""
    f = _open_json(path)

    def read() -> bytes:
        try:
            return f.read(BLOCK_BYTES)
        except (EOFError, zlib.error, isal_zlib.error, gzip.BadGzipFile) as exc:
            raise _truncated(path, exc) from None

    try:
        with ThreadPoolExecutor(1) as pool:
            nxt: Future = pool.submit(read)
            carry = b""
            line_no = 1
            while True:
                data = nxt.result()
                if not data:
                    if carry:
                        yield carry, line_no, True
                    return
                nxt = pool.submit(read)
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block: keep reading
                    carry += data
                    continue
                # One copy of the block, however the lines fall.
                block = b"".join((carry, memoryview(data)[:cut]))
                carry = data[cut:]
                yield block, line_no, False
                line_no += block.count(b"\n")
    finally:
        f.close()


@dataclass
class _Parsed:
    table: pa.Table
    line_index: np.ndarray  # 0-based line within the block of each row
    starts: np.ndarray
    ends: np.ndarray


def _line_spans(block: bytes) -> tuple[np.ndarray, np.ndarray]:
    nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
    starts = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl, [len(block)]])
    if starts[-1] == len(block):  # the block ends with a newline: no line after it
        starts, ends = starts[:-1], ends[:-1]
    return starts, ends


def _read_json_bytes(data: bytes, schema: pa.Schema) -> pa.Table:
    return pj.read_json(
        pa.BufferReader(data),
        read_options=pj.ReadOptions(block_size=max(1 << 20, min(len(data) // 4 + 1, 8 << 20))),
        parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))


def _parse_json_block(block: bytes, schema: pa.Schema, at_eof: bool = False
                      ) -> tuple[_Parsed, list[tuple[int, str, str]]]:
    """Parse whole lines. Fast path: one pyarrow call. If it fails (or rows and lines disagree),
    split in halves until the failing lines are alone and give each a reason."""
    starts, ends = _line_spans(block)
    lengths = ends - starts
    nonblank = (lengths > 0) & ~((lengths == 1) & (np.frombuffer(block, np.uint8)[
        np.minimum(starts, len(block) - 1)] == 13))
    try:
        block.decode("utf-8")
        table = _read_json_bytes(block, schema)
        if table.num_rows == int(nonblank.sum()):
            return _Parsed(table, np.flatnonzero(nonblank), starts, ends), []
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pass
    tables: list[pa.Table] = []
    index: list[np.ndarray] = []
    refused: list[tuple[int, str, str]] = []
    unterminated_last = at_eof and not block.endswith(b"\n")
    _bisect(block, starts, ends, nonblank, 0, len(starts), schema, tables, index, refused,
            unterminated_last)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    line_index = np.concatenate(index) if index else np.zeros(0, np.int64)
    return _Parsed(table, line_index, starts, ends), refused


def _bisect(block: bytes, starts: np.ndarray, ends: np.ndarray, nonblank: np.ndarray, lo: int,
            hi: int, schema: pa.Schema, tables: list, index: list, refused: list,
            unterminated_last: bool) -> None:
    if hi <= lo:
        return
    piece = block[starts[lo]:ends[hi - 1]] + b"\n"
    expected = int(nonblank[lo:hi].sum())
    if expected == 0:
        return
    try:
        piece.decode("utf-8")
        table = _read_json_bytes(piece, schema)
        if table.num_rows == expected:
            tables.append(table)
            index.append(np.flatnonzero(nonblank[lo:hi]) + lo)
            return
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pass
    if hi - lo > 1:
        mid = (lo + hi) // 2
        _bisect(block, starts, ends, nonblank, lo, mid, schema, tables, index, refused,
                unterminated_last)
        _bisect(block, starts, ends, nonblank, mid, hi, schema, tables, index, refused,
                unterminated_last)
        return
    raw = block[starts[lo]:ends[lo]]
    if not raw.strip():
        return  # a line of blanks
    is_last = unterminated_last and hi == len(starts)
    refused.append((lo, _diagnose(raw, is_last, schema.names),
                    raw.decode("utf-8", "backslashreplace")))


_TYPE_CHECKS: dict[str, tuple[tuple[type, ...], str]] = {
    "rating": ((int, float), "rating is not a number"),
    "timestamp": ((int,), "timestamp is not an integer"),
    "helpful_vote": ((int,), "helpful_vote is not an integer"),
    "verified_purchase": ((bool,), "verified_purchase is not true/false"),
    "title": ((str,), "title is not a string"),
    "text": ((str,), "text is not a string"),
    "asin": ((str,), "asin is not a string"),
    "parent_asin": ((str,), "parent_asin is not a string"),
    "user_id": ((str,), "user_id is not a string"),
    "main_category": ((str,), "main_category is not a string"),
    "store": ((str,), "store is not a string"),
}


def _diagnose(raw: bytes, is_last: bool, fields: Sequence[str]) -> str:
    """Why pyarrow refused one line, in words a person can act on."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "non-UTF-8 bytes"
    try:
        obj = json.loads(text)
    except ValueError:
        return "truncated last line" if is_last else "malformed JSON"
    if not isinstance(obj, dict):
        return "not a JSON object"
    for key, (types, reason) in _TYPE_CHECKS.items():
        value = obj.get(key) if key in fields else None
        if value is None:
            continue
        if isinstance(value, bool) and bool not in types:
            return reason
        if not isinstance(value, types):
            return reason
    return "unreadable JSON line"


def _json_raws(block: bytes, parsed: _Parsed) -> Any:
    def raw(i: int) -> str:
        k = parsed.line_index[i]
        return block[parsed.starts[k]:parsed.ends[k]][:RAW_CHARS * 4].decode("utf-8", "replace")
    return raw


def _read_parquet_reviews(path: Path) -> Iterator[_Chunk]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise _bad_parquet(path, exc) from None
    names = set(pf.schema_arrow.names)
    absent = [c for c in REQUIRED if c not in names]
    if absent:
        raise InputError(
            f"{path} has no column(s) {', '.join(absent)}; reviews need rating, parent_asin, "
            "user_id and timestamp (Amazon Reviews'23 layout)")
    cols = [c for c in READ_SCHEMA.names if c in names]
    base = 0
    batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=cols)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise _bad_parquet(path, exc) from None
        table, pre_reason = _coerce_parquet(pa.Table.from_batches([batch]))
        n = table.num_rows

        def raw(i: int, batch: pa.RecordBatch = batch) -> str:
            return json.dumps(batch.slice(i, 1).to_pylist()[0], default=str)

        yield _Chunk(table, str(path), np.arange(base, base + n), raw, [], pre_reason)
        base += n


def _coerce_parquet(table: pa.Table) -> tuple[pa.Table, np.ndarray | None]:
    """Cast parquet columns to READ_SCHEMA; values that cannot be cast get a per-row reason."""
    pre: np.ndarray | None = None
    cols = {}
    for field in READ_SCHEMA:
        if field.name not in table.column_names:
            cols[field.name] = pa.nulls(table.num_rows, field.type)
            continue
        col = table.column(field.name)
        if col.type == field.type:
            cols[field.name] = col
            continue
        if field.name == "timestamp" and pa.types.is_timestamp(col.type):
            cols[field.name] = col.cast(pa.timestamp("ms")).cast(pa.int64())
            continue
        try:
            cols[field.name] = col.cast(field.type)
            continue
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        # Value by value: what cannot be read becomes null plus a reason.
        values = pd.to_numeric(pd.Series(col.to_pylist(), dtype=object), errors="coerce")
        if field.name == "timestamp":
            ok = values.notna() & (values == values.round())
            cols[field.name] = pa.array(values.where(ok).astype("Int64"), pa.int64())
            reason = "timestamp is not an integer"
        else:
            ok = values.notna()
            cols[field.name] = pa.array(values.where(ok).astype("Float64"), field.type)
            reason = f"{field.name} is not a number"
        bad = ~ok.to_numpy() & col.is_valid().to_numpy(zero_copy_only=False)
        if bad.any():
            if pre is None:
                pre = np.full(table.num_rows, None, dtype=object)
            pre[bad & (pre == None)] = reason  # noqa: E711 (elementwise)
    return pa.table(cols, schema=READ_SCHEMA), pre


# ---------------------------------------------------------------------------------------------
# Checks on values, vectorized.


def _validate(chunk: _Chunk, now_ms: int, quarantine: _Quarantine) -> tuple[_Good, int, int]:
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
    return _Good(good, mask), n_seconds, int(has_ts.sum())


def _to_output(t: pa.Table, rows: np.ndarray) -> pa.Table:
    text = t.column("text")
    return pa.table({
        "parent_asin": t.column("parent_asin"),
        "asin": pc.coalesce(t.column("asin"), t.column("parent_asin")),
        "user_id": t.column("user_id"),
        "timestamp": t.column("timestamp"),
        "rating": t.column("rating").cast(pa.float32()),
        "title": t.column("title"),
        "text": text,
        "text_chars": pc.utf8_length(text).fill_null(0).cast(pa.int32()),
        "helpful_vote": t.column("helpful_vote").fill_null(0).cast(pa.int32()),
        "verified_purchase": t.column("verified_purchase").fill_null(False),
        "_row": pa.array(rows.astype(np.int64)),
    }, schema=_SPILL_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Buckets.


class _Spill:
    """One parquet file per bucket, appended to in row groups of buffered rows (lz4, no
    dictionaries or statistics: read back whole, once)."""

    def __init__(self, folder: Path, n_buckets: int) -> None:
        self.folder = folder / f"n{n_buckets}"
        self.folder.mkdir(parents=True)
        self.n_buckets = n_buckets
        self.writers: dict[int, pq.ParquetWriter] = {}
        self.pending: dict[int, list[pa.Table]] = {}
        self.pending_bytes = 0

    def path(self, b: int) -> Path:
        return self.folder / f"{b:05d}.parquet"

    def add(self, table: pa.Table) -> None:
        buckets = bucket_of(table.column("parent_asin"), self.n_buckets)
        if self.n_buckets == 1:
            self._buffer(0, table)
            return
        order = np.argsort(buckets, kind="stable")
        table = table.take(pa.array(order))
        bounds = np.searchsorted(buckets[order], np.arange(self.n_buckets + 1))
        for b in range(self.n_buckets):
            if bounds[b + 1] > bounds[b]:
                self._buffer(b, table.slice(bounds[b], bounds[b + 1] - bounds[b]))

    def _buffer(self, b: int, table: pa.Table) -> None:
        self.pending.setdefault(b, []).append(table)
        self.pending_bytes += table.nbytes
        if self.pending_bytes >= SPILL_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write every bucket's buffered rows (input order kept within a bucket)."""
        for b, parts in sorted(self.pending.items()):
            w = self.writers.get(b)
            if w is None:
                w = self.writers[b] = pq.ParquetWriter(
                    self.path(b), _SPILL_SCHEMA, compression=_SPILL_COMPRESSION,
                    use_dictionary=False, write_statistics=False)
            w.write_table(pa.concat_tables(parts))
        self.pending.clear()
        self.pending_bytes = 0

    def close(self) -> None:
        self.flush()
        for w in self.writers.values():
            w.close()
        self.writers.clear()

    def regroup(self, n_buckets: int) -> _Spill:
        new = _Spill(self.folder.parent, n_buckets)
        for b in range(self.n_buckets):
            if self.path(b).exists():
                pf = pq.ParquetFile(self.path(b))
                for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                    new.add(pa.Table.from_batches([batch]))
                self.path(b).unlink()
        new.close()
        return new


def _finish_buckets(spill: _Spill, out: Path) -> list[tuple[int, int, int, int]]:
    """Sort, deduplicate and write every bucket (two at a time; Arrow releases the GIL)."""
    def one(b: int) -> tuple[int, int, int, int]:
        folder = out / f"bucket={b:05d}"
        folder.mkdir()
        src = spill.path(b)
        table = pq.read_table(src) if src.exists() else _SPILL_SCHEMA.empty_table()
        rows, dups, lo, hi = _sort_dedupe_write(table, folder / "part-0.parquet")
        src.unlink(missing_ok=True)
        return rows, dups, lo, hi

    workers = min(2, max(1, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(spill.n_buckets)))


def _sort_dedupe_write(table: pa.Table, path: Path) -> tuple[int, int, int, int]:
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
    table = table.drop_columns(["_row"])
    pq.write_table(table, path, compression="zstd", row_group_size=1 << 20)
    if table.num_rows == 0:
        return 0, dups, 0, 0
    lo, hi = pc.min_max(table.column("timestamp")).values()
    return table.num_rows, dups, lo.as_py(), hi.as_py()


def _write_products(path: Path, meta: pa.Table, products: pa.Array) -> int:
    """products.parquet: one row per reviewed product, metadata where there is some. Returns how
    many reviewed products have no metadata."""
    known = pc.is_in(meta.column("parent_asin"), value_set=products)
    rows = meta.filter(known)
    absent = products.filter(pc.invert(pc.is_in(products, value_set=meta.column("parent_asin"))))
    if len(absent):
        rows = pa.concat_tables([rows, pa.table({
            "parent_asin": absent, **{c: pa.nulls(len(absent), pa.string())
                                      for c in ("title", "main_category", "store")}},
            schema=META_SCHEMA)])
    rows = rows.sort_by("parent_asin")
    with atomic_path(path) as tmp:
        pq.write_table(rows, tmp, compression="zstd")
    return len(absent)
