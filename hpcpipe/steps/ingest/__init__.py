"""The ingest step: raw reviews + product metadata -> validated, deduplicated, bucketed parquet.

Output (see docs/contracts.md, "Ingest output"): ``reviews/bucket=NNNNN/part-0.parquet``,
``products.parquet``, ``quarantine.jsonl`` and, written last, ``manifest.json``.

How it runs, in bounded memory, one module per part:

1. :mod:`.inputs`: the files are checked and described for the manifest, the reviews counted
   roughly to guess the bucket count; with no input configured a synthetic one is made once.
2. :mod:`.parts`: the input is cut into parts (files; parquet row groups; line ranges of an
   uncompressed JSON lines file), each read as a task on the step's Dask cluster -- the same
   machinery as features (:mod:`hpcpipe.runtime.dask_cluster`: a LocalCluster sized from the
   allocation, dask-jobqueue's SLURMRunner on several nodes). A part is read in blocks
   (:mod:`.reading`), checked (:mod:`.validation`; refused rows to its quarantine file with
   file, line, reason and raw text) and spilled to hash buckets of its own (:mod:`.buckets`).
3. Then every bucket is a task: its rows from all parts sorted, deduplicated and written; the
   quarantines are merged in input order; the buckets' products and counts summed, and the
   metadata checked against those products before anything is installed.

Work in progress lives in ``.work-<fingerprint>/`` next to the output: after a kill, the parts
and buckets already finished are not read again (a finished bucket's spill is deleted as soon as
it is written). The reviews folder is renamed into place when every bucket is done (a kill before
the manifest: the next run takes it back), and ``manifest.json`` comes last, so a crash never
leaves output that looks complete. A manifest whose fingerprint is that of the same input files
and settings means "already done" (see :mod:`hpcpipe.run.provenance`). The output does not
depend on how many workers or nodes ran it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from hpcpipe.config import IngestConfig, RunConfig
from hpcpipe.files import atomic_path, temp_name, write_json
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.metrics import MetricsWriter
from hpcpipe.run.provenance import fingerprint
from hpcpipe.runtime.dask_cluster import usable_cpus
from hpcpipe.runtime.env import JobEnvironment
from hpcpipe.runtime.memory import release_memory
from hpcpipe.steps.done import already_done
from hpcpipe.steps.ingest.buckets import bucket_count, bucket_of, run_starts
from hpcpipe.steps.ingest.inputs import (
    checked_inputs,
    configured_inputs,
    describe,
    estimate_rows,
    synthesize_once,
)
from hpcpipe.steps.ingest.parts import (
    Part,
    bucket_products,
    finish_bucket,
    first_products,
    merge_quarantine,
    planned_parts,
    read_part,
    regroup_part,
)
from hpcpipe.steps.ingest.reading import META_SCHEMA, write_metadata
from hpcpipe.steps.ingest.validation import (
    REASON_SECONDS,
    Quarantine,
    check_coverage,
    check_some_valid,
    check_timestamp_unit,
)

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WORK_PREFIX = ".work-"
INSTALLED = "installed.json"  # in the work folder: the reviews were (being) renamed into place
#: Products in the first block of the input that make the early metadata check worth trusting.
_EARLY_COVERAGE_PRODUCTS = 50
#: The manifest fields a skipped ingest repeats in its metrics summary.
_SUMMARY_FIELDS = ("rows_in", "rows_out", "quarantined", "duplicates", "n_buckets")


def run(layout: RunLayout, cfg: RunConfig, metrics: MetricsWriter,
        env: JobEnvironment | None = None) -> dict[str, Any]:
    """The ingest step of a run: synthesize into ``layout.raw`` when ``cfg.data.reviews`` is empty
    (reusing a complete earlier synthesis of the same size and seed), then :func:`ingest` into
    ``layout.ingest`` on a Dask cluster sized from the allocation ``env``.

    Under ``srun`` on several nodes every rank calls this; only the client rank ingests, the
    scheduler and worker ranks return ``{}`` when the cluster shuts down.
    """
    from hpcpipe.runtime.dask_cluster import open_cluster

    if env is None:
        env = JobEnvironment.from_environ()
    if env.num_nodes <= 1 or env.task_rank == 1:
        # One process decides the input (a synthesis is written once, not once per rank).
        reviews, metadata = configured_inputs(layout, cfg)
        done = _done_before(layout.ingest / MANIFEST, _made_from(reviews, metadata, cfg.ingest),
                            metrics)
        if done is not None and env.num_nodes <= 1:
            return done
    job_id = env.job_id if env.in_slurm else "local"
    layout.ingest.mkdir(parents=True, exist_ok=True)
    scheduler_file = layout.ingest / f".dask-scheduler-{job_id}-{env.restart_count}.json"
    with open_cluster(_ClusterOfOne(), scheduler_file=scheduler_file, env=env,
                      step="ingest") as client:
        if client is None:
            return {}
        return ingest(reviews, metadata, layout.ingest, cfg.ingest, metrics, client=client)


@dataclass(frozen=True)
class _ClusterOfOne:
    """Ingest's workers: one thread each (a part's reading already overlaps parsing with
    checking), the allocation's memory split evenly."""

    threads_per_worker: int = 1
    worker_memory: str = "auto"


def _made_from(reviews: Sequence[Path], metadata: Path, cfg: IngestConfig) -> dict[str, Any]:
    return {
        "inputs": [describe(Path(p), "reviews") for p in reviews]
        + [describe(Path(metadata), "metadata")],
        # What changes the output besides the files (data.* names the files themselves).
        "settings": {"ingest.target_bucket_rows": cfg.target_bucket_rows,
                     "ingest.future_tolerance_days": cfg.future_tolerance_days,
                     "ingest.keep_text": cfg.keep_text},
    }


def ingest(reviews_paths: Sequence[Path | str], metadata_path: Path | str | None,
           out_dir: Path, cfg: IngestConfig, metrics: MetricsWriter | None = None,
           client: Client | None = None) -> dict[str, Any]:
    """Validate, deduplicate and bucket the reviews into ``out_dir`` (the contract's ``ingest/``).

    ``reviews_paths``: JSON lines (``.jsonl``/``.json``/``.ndjson``, optionally ``.gz``) or
    ``.parquet`` files. ``metadata_path``: the product metadata in the same formats. The parts
    and buckets run as tasks on ``client``'s Dask cluster, or one after the other in this process
    without one; the output is the same. Returns the manifest dict (also written to
    ``out_dir/manifest.json``, with ``made_from``: the input files and settings, and its
    ``fingerprint``); if a manifest with the same fingerprint already exists, nothing is redone
    and it is returned with ``"skipped": True``. Raises :class:`InputError` for input that cannot
    be used as a whole (missing or unreadable file, truncated gzip/parquet, unknown extension, no
    valid rows, a whole file of second timestamps, metadata that does not match the reviews).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    reviews, metadata = checked_inputs(reviews_paths, metadata_path)
    made_from = _made_from(reviews, metadata, cfg)
    done = _done_before(out_dir / MANIFEST, made_from, metrics)
    if done is not None:
        return done
    fp = fingerprint(made_from)
    work = out_dir / f"{WORK_PREFIX}{fp[:16]}"
    _remove_temporaries(out_dir, keep=work)
    work.mkdir(exist_ok=True)
    _reclaim(work, out_dir / "reviews")

    n_guess = _guess_buckets(reviews, cfg)
    tasks = _Tasks(client)
    parts = planned_parts(work, reviews, tasks.workers(), usable_cpus())
    log.info("%d part(s) of %d file(s) on %s", len(parts), len(reviews), tasks.describe())
    # On a cluster the parts start now; the metadata is read here meanwhile, and checked against
    # the first reviews at once: metadata of another category fails in seconds, not after the
    # whole input was read.
    reading = tasks.run("read", read_part, [(p, str(work), n_guess, _latest_ms(cfg),
                                             cfg.keep_text) for p in parts], _part_done(parts))
    meta_file = work / "metadata.parquet"
    try:
        # To disk a block at a time, not into this process's memory while the workers need
        # theirs (the full data set lists 48M products).
        write_metadata(metadata, meta_file)
        release_memory()  # what parsing the (large) metadata records freed
        sample = first_products(reviews[0])
        if len(sample) >= _EARLY_COVERAGE_PRODUCTS:
            check_coverage(sample, meta_file, reviews[0], metadata)
        del sample
        release_memory()  # the first block's parse: this process then waits on the parts
    except BaseException:
        tasks.cancel()
        raise
    read = {r["part"]["index"]: r for r in reading}
    rows_in = sum(r["rows_in"] for r in read.values())
    valid = sum(r["valid"] for r in read.values())
    log.info("read and checked %d rows in %.1f s", rows_in, time.perf_counter() - start)
    with Quarantine(out_dir / "quarantine.jsonl") as quarantine:
        merge_quarantine(work, parts, read, quarantine)
        _check_units(parts, read)
        check_some_valid(reviews, rows_in, valid, quarantine)
        n_buckets = _regrouped(tasks, work, len(parts), valid, n_guess, cfg)
        buckets = list(tasks.run("bucket", finish_bucket,
                                 [(str(work), b, len(parts), n_buckets, cfg.keep_text)
                                  for b in range(n_buckets)], _bucket_done))
        # The products come from the finished buckets; nothing is installed unless the
        # metadata covers them.
        products = bucket_products(work, n_buckets)
        check_coverage(products, meta_file, reviews[0], metadata)
        release_memory()
        _install(work / "reviews", out_dir / "reviews", work / INSTALLED)
        log.info("sorted and wrote %d buckets; %.1f s so far", n_buckets,
                 time.perf_counter() - start)
        missing = _write_products(out_dir / "products.parquet", meta_file, products)

    manifest = _manifest(rows_in, quarantine, buckets, len(products), missing,
                         time.perf_counter() - start)
    manifest.update(made_from=made_from, fingerprint=fp)
    write_json(out_dir / MANIFEST, manifest)
    shutil.rmtree(work, ignore_errors=True)
    _report(manifest, quarantine, metadata, metrics)
    return manifest


class _Tasks:
    """Tasks on a Dask cluster (``client``), or in this process one after the other."""

    def __init__(self, client: Client | None) -> None:
        self.client = client
        self.tag = uuid.uuid4().hex[:8]
        self.futures: list[Any] = []

    def workers(self) -> int:
        if self.client is None:
            return 1
        return len(self.client.scheduler_info(n_workers=-1)["workers"])

    def describe(self) -> str:
        if self.client is None:
            return "this process"
        n = self.workers()
        return f"{n} Dask worker{'s' if n != 1 else ''}"

    def run(self, what: str, fn: Callable[..., Any], calls: list[tuple[Any, ...]],
            done: Callable[[Any], str]) -> Generator[Any, None, None]:
        """``fn(*args)`` for every tuple in ``calls``; results as they come, each logged with
        ``done(result)``. On a cluster the tasks are submitted before this returns; closing the
        generator once it has yielded cancels them, before that :meth:`cancel` does. In this
        process each runs when its result is asked for."""
        if self.client is None:
            return self._here(fn, calls, done)
        self.futures = [self.client.submit(fn, *args, key=f"ingest-{what}-{i:05d}-{self.tag}",
                                           pure=False) for i, args in enumerate(calls)]
        return self._results(self.futures, done)

    def cancel(self) -> None:
        """Cancel the tasks of the last :meth:`run` on the cluster."""
        for future in self.futures:
            future.cancel()

    @staticmethod
    def _here(fn: Callable[..., Any], calls: list[tuple[Any, ...]],
              done: Callable[[Any], str]) -> Generator[Any, None, None]:
        for args in calls:
            result = fn(*args)
            log.info("%s", done(result))
            yield result

    @staticmethod
    def _results(futures: list[Any], done: Callable[[Any], str]) -> Generator[Any, None, None]:
        from distributed import as_completed

        try:
            for future in as_completed(futures):
                result = future.result()
                # Let the cluster forget it: a worker that dies later holds nothing to redo.
                future.release()
                log.info("%s", done(result))
                yield result
        finally:
            for future in futures:
                future.cancel()


def _part_done(parts: list[Part]) -> Callable[[dict[str, Any]], str]:
    def done(r: dict[str, Any]) -> str:
        part = parts[r["part"]["index"]]
        if r.get("skipped"):
            return f"part {part.index + 1}/{len(parts)} ({part.describe()}) already read, skipped"
        return (f"part {part.index + 1}/{len(parts)} ({part.describe()}): {r['rows_in']} rows in "
                f"{r['seconds']:.1f} s on {r['node']}")
    return done


def _bucket_done(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return f"bucket {r['bucket']:05d} already written, skipped"
    return f"bucket {r['bucket']:05d}: {r['rows']} rows on {r['node']}"


def _check_units(parts: list[Part], read: dict[int, dict[str, Any]]) -> None:
    """Every file's timestamps in seconds is the file's error, not its rows'."""
    seconds: Counter[str] = Counter()
    usable: Counter[str] = Counter()
    for p in parts:
        seconds[p.path] += read[p.index]["seconds_like"]
        usable[p.path] += read[p.index]["with_timestamp"]
    for path in dict.fromkeys(p.path for p in parts):
        check_timestamp_unit(Path(path), seconds[path], usable[path])


def _regrouped(tasks: _Tasks, work: Path, n_parts: int, valid: int, n_guess: int,
               cfg: IngestConfig) -> int:
    """The bucket count; every part re-spilled to it when the guess was far off."""
    n_buckets = bucket_count(valid, n_guess, cfg.target_bucket_rows)
    if n_buckets != n_guess:
        log.info("%d valid rows need %d buckets, not the %d estimated: redistributing",
                 valid, n_buckets, n_guess)
        list(tasks.run("regroup", regroup_part, [(str(work), p, n_guess, n_buckets,
                                                  cfg.keep_text) for p in range(n_parts)],
                       lambda node: f"part re-spilled on {node}"))
    return n_buckets


def _install(folder: Path, dest: Path, marker: Path) -> None:
    """Rename the finished ``folder`` to ``dest`` (an old ``dest`` is moved aside, then removed),
    having first written ``marker``: a run killed after the rename and before its manifest finds
    the reviews at ``dest`` (:func:`_reclaim`)."""
    write_json(marker, {"installed_to": str(dest)})
    old = temp_name(dest) if dest.exists() else None
    if old is not None:
        os.replace(dest, old)
    if not folder.exists():
        folder.mkdir(parents=True)
    os.replace(folder, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _reclaim(work: Path, dest: Path) -> None:
    """Continuing an ingest that was killed while or after installing its reviews (``work`` holds
    the marker :func:`_install` writes first): they go back into ``work``, where the finished
    buckets are looked for (their spill is deleted, so they could not be written again)."""
    marker = work / INSTALLED
    if not marker.is_file():
        return
    if not (work / "reviews").exists() and dest.is_dir():
        os.replace(dest, work / "reviews")
        log.info("took the reviews installed by the killed ingest back into %s", work)
    marker.unlink()


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


def _remove_temporaries(out_dir: Path, keep: Path) -> None:
    """Temporaries left by a killed run, and the work folder of other inputs or settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob(".tmp-*"), *out_dir.glob(f"{WORK_PREFIX}*")]:
        if stale == keep:
            log.info("continuing the ingest that %s was left by", stale)
            continue
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


def _write_products(path: Path, meta_file: Path, products: pa.Array) -> int:
    """products.parquet: one row per reviewed product, sorted by parent_asin, from the first
    metadata row of each (``meta_file``, in file order), or nulls where there is none. Returns how
    many reviewed products have no metadata.

    Memory is that of the kept rows and one column at a time: the rows and their order are found
    by sorting parent_asin alone (no hash table of every product: dictionary-encoding 1.2M
    distinct values took 0.17 GB), then each column is read and put in that order. Reading the
    whole table and deduplicating it in Python objects took the client from 0.2 to 0.7 GB at 1.2M
    products, the peak of the whole ingest.
    """
    meta = pq.ParquetFile(meta_file)
    parent = meta.read(columns=["parent_asin"]).column(0).combine_chunks()
    by_name = pc.sort_indices(parent)  # stable: a product's rows stay in file order
    ordered = parent.take(by_name)
    del parent
    first = run_starts(ordered)  # the first row of each product in that order
    names = ordered.filter(pa.array(first))
    rows = by_name.to_numpy()[first]
    del ordered, by_name
    reviewed = pc.is_in(names, value_set=products)
    names = names.filter(reviewed)
    rows = rows[reviewed.to_numpy(zero_copy_only=False)]
    absent = (products.filter(pc.invert(pc.is_in(products, value_set=names)))
              if len(names) < len(products) else products.slice(0, 0)).cast(pa.string())
    take = pa.array(rows)
    source = None  # with absent products: where each output row comes from, kept rows first
    if len(absent):
        order = pc.sort_indices(pa.concat_arrays([names, absent])).to_numpy()
        source = pa.array(order)
    del names, rows
    release_memory()
    columns = []
    for field in META_SCHEMA:
        column = meta.read(columns=[field.name]).column(0).take(take)
        if source is not None:
            fill = absent if field.name == "parent_asin" else pa.nulls(len(absent), field.type)
            column = pa.chunked_array([*column.chunks, fill]).combine_chunks().take(source)
        columns.append(column)
        release_memory()
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns, schema=META_SCHEMA), tmp, compression="zstd")
    return len(absent)


def _manifest(rows_in: int, quarantine: Quarantine, buckets: list[dict[str, Any]],
              products: int, missing: int, seconds: float) -> dict[str, Any]:
    rows_out = sum(b["rows"] for b in buckets)
    duplicates = sum(b["duplicates"] for b in buckets)
    min_ts = min(b["min_timestamp"] for b in buckets if b["rows"])
    max_ts = max(b["max_timestamp"] for b in buckets if b["rows"])
    max_day = datetime.fromtimestamp(max_ts / 1000, UTC).date()
    quarantined = quarantine.count
    assert rows_in == rows_out + quarantined + duplicates, (rows_in, rows_out, quarantined,
                                                            duplicates)
    return {
        "n_buckets": len(buckets), "rows_in": rows_in, "rows_out": rows_out,
        "quarantined": quarantined, "duplicates": duplicates,
        "reasons": dict(sorted(quarantine.reasons.items())),
        "min_timestamp": int(min_ts), "max_timestamp": int(max_ts),
        "last_week": (max_day - timedelta(days=max_day.weekday())).isoformat(),
        "products": products, "products_without_metadata": missing,
        "seconds": round(seconds, 3), "rows_per_s": round(rows_in / max(seconds, 1e-9), 1),
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
