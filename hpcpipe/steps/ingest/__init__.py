"""The ingest step: raw reviews + product metadata -> validated, deduplicated, bucketed parquet.

Output (see docs/contracts.md, "Ingest output"): ``reviews/bucket=NNNNN/part-0.parquet``,
``products.parquet``, ``quarantine.jsonl`` and, written last, ``manifest.json``.

How it runs, in bounded memory, one module per part:

1. :mod:`.inputs`: the files are checked and described for the manifest, the reviews counted
   roughly to guess the bucket count; with no input configured a synthetic one is made once.
2. :mod:`.reading`: product metadata is read (only parent_asin, title, main_category, store);
   reviews are streamed in blocks of ~32 MB of JSON lines or ~1M parquet rows.
3. :mod:`.validation`: vectorized checks on every block; refused rows go to ``quarantine.jsonl``
   with their file, line, reason and raw text.
4. :mod:`.buckets`: valid rows are spilled per hash bucket, redistributed once if the guess was far
   off, and each bucket is sorted, deduplicated and written.

The reviews folder is built under a temporary name and renamed; ``manifest.json`` comes last, so a
crash never leaves output that looks complete. A manifest whose fingerprint is that of the same
input files and settings means "already done" (see :mod:`hpcpipe.run.provenance`).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from hpcpipe.config import IngestConfig, RunConfig
from hpcpipe.files import atomic_path, temp_name, write_json
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.metrics import MetricsWriter
from hpcpipe.run.provenance import fingerprint
from hpcpipe.runtime.env import JobEnvironment
from hpcpipe.steps.done import already_done
from hpcpipe.steps.ingest.buckets import (
    BucketStats,
    Spill,
    bucket_count,
    bucket_of,
    finish_buckets,
    spill_rows,
)
from hpcpipe.steps.ingest.inputs import (
    checked_inputs,
    configured_inputs,
    describe,
    estimate_rows,
    synthesize_once,
)
from hpcpipe.steps.ingest.reading import META_SCHEMA, read_metadata, read_reviews
from hpcpipe.steps.ingest.validation import (
    REASON_SECONDS,
    Quarantine,
    check_coverage,
    check_some_valid,
    check_timestamp_unit,
    validate,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: The manifest fields a skipped ingest repeats in its metrics summary.
_SUMMARY_FIELDS = ("rows_in", "rows_out", "quarantined", "duplicates", "n_buckets")


def run(layout: RunLayout, cfg: RunConfig, metrics: MetricsWriter,
        env: JobEnvironment | None = None) -> dict[str, Any]:
    """The ingest step of a run: synthesize into ``layout.raw`` when ``cfg.data.reviews`` is empty
    (reusing a complete earlier synthesis of the same size and seed), then :func:`ingest` into
    ``layout.ingest``. Returns the ingest manifest (plus ``"skipped": True`` if already done).
    Ingest runs as one process, so ``env`` is not needed."""
    reviews, metadata = configured_inputs(layout, cfg)
    return ingest(reviews, metadata, layout.ingest, cfg.ingest, metrics)


def ingest(reviews_paths: Sequence[Path | str], metadata_path: Path | str | None,
           out_dir: Path, cfg: IngestConfig, metrics: MetricsWriter | None = None
           ) -> dict[str, Any]:
    """Validate, deduplicate and bucket the reviews into ``out_dir`` (the contract's ``ingest/``).

    ``reviews_paths``: JSON lines (``.jsonl``/``.json``/``.ndjson``, optionally ``.gz``) or
    ``.parquet`` files. ``metadata_path``: the product metadata in the same formats. Returns the
    manifest dict (also written to ``out_dir/manifest.json``, with ``made_from``: the input files
    and settings, and its ``fingerprint``); if a manifest with the same fingerprint already
    exists, nothing is redone and it is returned with ``"skipped": True``. Raises
    :class:`InputError` for input that cannot be used as a whole (missing or unreadable file,
    truncated gzip/parquet, unknown extension, no valid rows, a whole file of second
    timestamps, metadata that does not match the reviews).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    reviews, metadata = checked_inputs(reviews_paths, metadata_path)
    made_from = {
        "inputs": [describe(p, "reviews") for p in reviews] + [describe(metadata, "metadata")],
        # What changes the output besides the files (data.* names the files themselves).
        "settings": {"ingest.target_bucket_rows": cfg.target_bucket_rows,
                     "ingest.future_tolerance_days": cfg.future_tolerance_days},
    }
    done = _done_before(out_dir / MANIFEST, made_from, metrics)
    if done is not None:
        return done
    _remove_temporaries(out_dir)

    meta = read_metadata(metadata)
    n_guess = _guess_buckets(reviews, cfg)
    spill_dir = temp_name(out_dir / "spill")
    spill_dir.mkdir()
    try:
        with Quarantine(out_dir / "quarantine.jsonl") as quarantine:
            read = _Reading(Spill(spill_dir, n_guess), quarantine, meta.column("parent_asin"),
                            metadata, _latest_ms(cfg))
            for path in reviews:
                read.read_file(path)
            read.spill.close()
            log.info("read and checked %d rows in %.1f s", read.rows_in,
                     time.perf_counter() - start)
            check_some_valid(reviews, read.rows_in, read.valid, quarantine)
            products = read.products()
            check_coverage(products, read.meta_ids, reviews[0], metadata)
            buckets = _write_reviews(read.spill, read.valid, out_dir, cfg, start)
            missing = _write_products(out_dir / "products.parquet", meta, products)
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)

    manifest = _manifest(read, buckets, len(products), missing, time.perf_counter() - start)
    manifest.update(made_from=made_from, fingerprint=fingerprint(made_from))
    write_json(out_dir / MANIFEST, manifest)
    _report(manifest, quarantine, metadata, metrics)
    return manifest


def _done_before(manifest_path: Path, made_from: dict[str, Any],
                 metrics: MetricsWriter | None) -> dict[str, Any] | None:
    """The manifest of an earlier ingest of the same inputs and settings, marked skipped; else
    None (a manifest that no longer matches is removed, so the old output cannot look
    complete)."""
    old = already_done(manifest_path, made_from, what="ingest")
    if old is None:
        return None
    log.info("ingest already done for these inputs (%s); skipping", manifest_path)
    old["skipped"] = True
    if metrics is not None:
        metrics.write("summary", **{k: old.get(k) for k in _SUMMARY_FIELDS},
                      seconds=0.0, rows_per_s=0.0, skipped=True)
    return old


def _remove_temporaries(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".tmp-*"):  # left by a run that was killed
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def _latest_ms(cfg: IngestConfig) -> int:
    """The latest review time accepted: now plus the configured tolerance, in ms."""
    return int(time.time() * 1000) + cfg.future_tolerance_days * 86_400_000


def _guess_buckets(reviews: list[Path], cfg: IngestConfig) -> int:
    estimate = sum(estimate_rows(p) for p in reviews)
    n_guess = max(1, math.ceil(estimate / cfg.target_bucket_rows))
    log.info("reading %d reviews file(s), about %d rows -> %d bucket(s) expected",
             len(reviews), estimate, n_guess)
    return n_guess


@dataclass
class _Reading:
    """Reading every reviews file into the spill: the counts and products found so far."""

    spill: Spill
    quarantine: Quarantine
    meta_ids: pa.ChunkedArray
    metadata: Path
    now_ms: int
    rows_in: int = 0
    valid: int = 0
    product_parts: list[pa.Array] = field(default_factory=list)
    coverage_checked: bool = False

    def read_file(self, path: Path) -> None:
        file_rows = file_seconds = file_ts = 0
        for chunk in read_reviews(path):
            for line, reason, raw in chunk.refused:
                self.quarantine.add(str(path), line, reason, raw)
            n = chunk.table.num_rows + len(chunk.refused)
            self.rows_in += n
            file_rows += n
            good, n_seconds, n_ts = validate(chunk, self.now_ms, self.quarantine)
            file_seconds += n_seconds
            file_ts += n_ts
            if good.num_rows == 0:
                continue
            # Input order across all files, so that "first kept" means first in the input.
            rows = spill_rows(good.table, self.rows_in - n + np.flatnonzero(good.mask))
            self._add_products(pc.unique(rows.column("parent_asin")), path)
            self.spill.add(rows)
            self.valid += rows.num_rows
        check_timestamp_unit(path, file_seconds, file_ts)
        log.info("%s: %d rows read", path, file_rows)

    def _add_products(self, uniq: pa.Array, path: Path) -> None:
        self.product_parts.append(uniq)
        if len(self.product_parts) > 16:  # keep the distinct products compact
            self.product_parts = [pc.unique(pa.chunked_array(self.product_parts).combine_chunks())]
        # Metadata of another category shows in the first products already: fail early.
        if not self.coverage_checked and len(uniq) >= 50:
            check_coverage(uniq, self.meta_ids, path, self.metadata)
            self.coverage_checked = True

    def products(self) -> pa.Array:
        """Every reviewed product once."""
        return pc.unique(pa.chunked_array(self.product_parts, pa.string()).combine_chunks())


def _write_reviews(spill: Spill, valid: int, out_dir: Path, cfg: IngestConfig,
                   start: float) -> list[BucketStats]:
    """``out_dir/reviews``, built under a temporary name from the spill (redistributed first if
    the guessed bucket count is far off)."""
    n_buckets = bucket_count(valid, spill.n_buckets, cfg.target_bucket_rows)
    if n_buckets != spill.n_buckets:
        log.info("%d valid rows need %d buckets, not the %d estimated: redistributing",
                 valid, n_buckets, spill.n_buckets)
        spill = spill.regroup(n_buckets)
    with atomic_path(out_dir / "reviews") as tmp_reviews:
        tmp_reviews.mkdir()
        stats = finish_buckets(spill, tmp_reviews)
    log.info("sorted and wrote %d buckets; %.1f s so far", n_buckets,
             time.perf_counter() - start)
    return stats


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


def _manifest(read: _Reading, buckets: list[BucketStats], products: int, missing: int,
              seconds: float) -> dict[str, Any]:
    rows_out = sum(b.rows for b in buckets)
    duplicates = sum(b.duplicates for b in buckets)
    min_ts = min(b.min_timestamp for b in buckets if b.rows)
    max_ts = max(b.max_timestamp for b in buckets if b.rows)
    max_day = datetime.fromtimestamp(max_ts / 1000, UTC).date()
    quarantined = read.quarantine.count
    assert read.rows_in == rows_out + quarantined + duplicates, (read.rows_in, rows_out,
                                                                 quarantined, duplicates)
    return {
        "n_buckets": len(buckets), "rows_in": read.rows_in, "rows_out": rows_out,
        "quarantined": quarantined, "duplicates": duplicates,
        "reasons": dict(sorted(read.quarantine.reasons.items())),
        "min_timestamp": int(min_ts), "max_timestamp": int(max_ts),
        "last_week": (max_day - timedelta(days=max_day.weekday())).isoformat(),
        "products": products, "products_without_metadata": missing,
        "seconds": round(seconds, 3), "rows_per_s": round(read.rows_in / max(seconds, 1e-9), 1),
    }


def _report(m: dict[str, Any], quarantine: Quarantine, metadata: Path,
            metrics: MetricsWriter | None) -> None:
    """The ingest's summary in the log and, with ``metrics``, as a ``summary`` record."""
    log.info("ingest: %d rows in, %d out, %d quarantined, %d duplicates, %d buckets, %.1f s "
             "(%.0f rows/s)", m["rows_in"], m["rows_out"], m["quarantined"], m["duplicates"],
             m["n_buckets"], m["seconds"], m["rows_per_s"])
    for reason, count in sorted(quarantine.reasons.items(), key=lambda kv: -kv[1]):
        log.info("quarantined %d: %s", count, reason)
    if m["products_without_metadata"]:
        log.warning("%d products (of %d) have no metadata in %s; their reviews are kept",
                    m["products_without_metadata"], m["products"], metadata)
    if metrics is not None:
        metrics.write("summary", **{k: m[k] for k in _SUMMARY_FIELDS},
                      seconds=m["seconds"], rows_per_s=m["rows_per_s"], reasons=m["reasons"],
                      products_without_metadata=m["products_without_metadata"])


__all__: list[str] = [
    "REASON_SECONDS", "bucket_count", "bucket_of", "ingest", "run", "synthesize_once",
]
