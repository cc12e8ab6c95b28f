"""The ingest's units of parallel work, each a plain function a Dask worker runs.

1. :func:`plan_parts`: the input cut into parts, in input order: every file at least one part; a
   parquet file split at row groups, an uncompressed JSON lines file at line starts. A gzip
   stream cannot be entered in the middle without an index of its deflate blocks, so a ``.gz``
   file is one part, unless there are at least :data:`GZ_SPLIT_WORKERS_PER_FILE` workers per
   file: then each large one is read through once with rapidgzip (all the client's CPUs), its
   index kept in the step's work folder, and it is split at line starts of the uncompressed
   stream like an uncompressed file. The plan is kept there too (``parts.json``): a rerun on
   another allocation reuses the parts it finished.
2. :func:`read_part`: one part read, checked and spilled to hash buckets in the part's own folder,
   with its own quarantine file and counts; ``done.json``, written last, makes a finished part
   skipped when the step runs again after a kill.
3. :func:`regroup_part` (only when the bucket guess was far off) and :func:`finish_bucket`: one
   bucket's rows from every part sorted, deduplicated and written, with its distinct products
   (a product's rows are all in one bucket: the buckets' lists are the input's, without a set
   of every product in any one process); its ``.json`` beside it, written last, marks it
   finished, and its spill is then deleted in the background (the deletes wait on the file
   system, not the CPU: 2.5-3.3 s for the 512 files of a 31.8M-review ingest on this project's
   machine, once spent at the very end with nothing else to do).

Exact whatever the parallelism: a spilled row's ``_row`` is (part index << 40) + its place in the
part, so "first in input order" is the same for one worker or many, and a part's quarantine lines
are renumbered by the lines of the parts before it when they are merged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from hpcpipe.errors import InputError, RunError
from hpcpipe.files import atomic_path, read_json, write_json
from hpcpipe.runtime.memory import release_memory
from hpcpipe.steps.ingest.buckets import (
    SPILL_SUFFIX,
    SPILLED,
    Spill,
    read_spill,
    spill_batches,
    spill_rows,
    spill_schema,
    write_bucket,
)
from hpcpipe.steps.ingest.inputs import bad_parquet, file_kind
from hpcpipe.steps.ingest.reading import (
    READ_SCHEMA,
    READ_SCHEMA_LENGTHS,
    build_gz_index,
    gz_line_starts,
    line_starts,
    read_reviews,
)
from hpcpipe.steps.ingest.validation import Quarantine, validate

#: Bytes of an uncompressed JSON lines part, rows of a parquet part: a few per worker at
#: 31.8M reviews, each far below a worker's memory (a part holds only its spill buffer).
PART_BYTES = 512 << 20
PART_ROWS = 4 << 20
ROW_SHIFT = 40  # a part's rows are numbered below 2**40
#: Split gzipped files only with this many workers per file or more. The index costs a whole
#: decompression before any part starts, and rapidgzip inflates a part at ~0.6x ISA-L's speed:
#: on 2 workers one 296 MB file took 12.0 s split against 8.1 s whole (bench/bench_gz_split.py),
#: while with many idle workers the parse, three quarters of ingest's CPU, is what gets shared.
GZ_SPLIT_WORKERS_PER_FILE = 4
DONE = "done.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """A piece of one reviews file: its bytes ``start:stop`` (JSON lines; stop -1 = the end) or
    its ``row_groups`` starting at row ``first_row`` (parquet)."""

    index: int
    path: str
    start: int = 0
    stop: int = -1
    row_groups: tuple[int, ...] | None = None
    first_row: int = 0
    gz_index: str | None = None  # a gzipped file's part: the index to seek in it with

    @property
    def whole_file(self) -> bool:
        return self.start == 0 and self.stop == -1 and self.row_groups is None

    def describe(self) -> str:
        name = Path(self.path).name
        if self.whole_file:
            return name
        if self.row_groups is not None:
            return f"{name} row groups {self.row_groups[0]}-{self.row_groups[-1]}"
        return f"{name} bytes {self.start}-{self.stop if self.stop >= 0 else 'end'}"


def plan_parts(reviews: list[Path], part_bytes: int | None = None,
               part_rows: int | None = None, gz_index_dir: Path | None = None,
               threads: int = 1) -> list[Part]:
    """The input's parts in input order (see the module doc); parts of ``part_bytes`` bytes or
    ``part_rows`` rows (default :data:`PART_BYTES`, :data:`PART_ROWS`). With ``gz_index_dir``
    a gzipped file is indexed there (``threads`` decompressing) and split too."""
    part_bytes = part_bytes or PART_BYTES
    part_rows = part_rows or PART_ROWS
    parts: list[Part] = []
    for n, path in enumerate(reviews):
        kind, gz = file_kind(path)
        if kind == "parquet":
            pieces = _parquet_pieces(path, part_rows)
            parts += [Part(len(parts) + i, str(path), row_groups=rg, first_row=first)
                      for i, (rg, first) in enumerate(pieces)]
            continue
        index = None
        # Below a quarter of a part compressed, the file is one part whatever its ratio (JSON
        # lines inflate 4-5x): no index for nothing.
        if gz and gz_index_dir is not None and path.stat().st_size >= part_bytes // 4:
            gz_index_dir.mkdir(parents=True, exist_ok=True)
            index = gz_index_dir / f"{n:05d}.gzindex"
            try:
                size = build_gz_index(path, index, threads)
                bounds = gz_line_starts(path, str(index), size, part_bytes)
            except InputError as exc:
                # Not split: read whole as always, so the file is judged by the one reader,
                # whether or not it is split (rapidgzip refuses a zero-padded file ISA-L reads).
                log.warning("%s is read whole, not split: %s", path.name, exc)
                index, bounds = None, [0, -1]
        elif gz:
            bounds = [0, -1]
        else:
            with open(path, "rb") as f:
                bounds = line_starts(f, path.stat().st_size, part_bytes)
        if len(bounds) == 2:  # one part: read whole, as a plain stream
            parts.append(Part(len(parts), str(path)))
            continue
        parts += [Part(len(parts) + i, str(path), lo, hi, gz_index=str(index) if index else None)
                  for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
    return parts


def planned_parts(work: Path, reviews: list[Path], n_workers: int,
                  threads: int) -> list[Part]:
    """The parts of this step's input (:func:`plan_parts`), planned once and kept in ``work``:
    a rerun (its finished parts are found by index) gets the same parts whatever its workers.
    Gzipped files are split only with :data:`GZ_SPLIT_WORKERS_PER_FILE` workers per file."""
    plan = work / "parts.json"
    if plan.is_file():
        return [Part(**dict(p, row_groups=tuple(p["row_groups"])
                            if p["row_groups"] is not None else None))
                for p in read_json(plan)["parts"]]
    split_gz = n_workers >= GZ_SPLIT_WORKERS_PER_FILE * len(reviews)
    parts = plan_parts(reviews, gz_index_dir=work / "gzindex" if split_gz else None,
                       threads=threads)
    write_json(plan, {"parts": [asdict(p) for p in parts]})
    return parts


def _parquet_pieces(path: Path, part_rows: int) -> list[tuple[tuple[int, ...] | None, int]]:
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as exc:
        raise bad_parquet(path, exc) from None
    if meta.num_row_groups <= 1:
        return [(None, 0)]
    pieces: list[tuple[tuple[int, ...] | None, int]] = []
    group: list[int] = []
    first = rows = 0
    for g in range(meta.num_row_groups):
        group.append(g)
        rows += meta.row_group(g).num_rows
        if rows - first >= part_rows:
            pieces.append((tuple(group), first))
            group, first = [], rows
    if group:
        pieces.append((tuple(group), first))
    return pieces if len(pieces) > 1 else [(None, 0)]


# ---------------------------------------------------------------------------------------------
# On a worker.


def where() -> str:
    """The node this runs on, as Slurm names it (the host name outside Slurm)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def part_dir(work: Path, index: int) -> Path:
    return Path(work) / "parts" / f"p{index:05d}"


def read_part(part: Part, work: str, n_buckets: int, now_ms: int,
              keep_text: bool = False) -> dict[str, Any]:
    """Read, check and spill one part (module doc); return its counts. A part finished before
    (its ``done.json`` exists) is not read again. The review title and text are spilled only
    with ``keep_text`` (their length always)."""
    folder = part_dir(Path(work), part.index)
    if (folder / DONE).is_file():
        return dict(read_json(folder / DONE), skipped=True)
    shutil.rmtree(folder, ignore_errors=True)  # a part cut short by a kill starts over
    folder.mkdir(parents=True)
    start = time.perf_counter()
    path = Path(part.path)
    rows_in = valid = seconds_like = with_ts = 0
    lines = 0
    spill = Spill(folder, n_buckets, spill_schema(keep_text))
    base = part.index << ROW_SHIFT
    with Quarantine(folder / "quarantine.jsonl") as quarantine:
        chunks = read_reviews(path, part.start, None if part.stop < 0 else part.stop,
                              part.row_groups, part.first_row,
                              READ_SCHEMA if keep_text else READ_SCHEMA_LENGTHS, part.gz_index)
        for chunk in chunks:
            for line, reason, raw in chunk.refused:
                quarantine.add(part.path, line, reason, raw)
            n = chunk.table.num_rows + len(chunk.refused)
            rows_in += n
            lines = max(lines, chunk.next_line - 1)
            good, n_seconds, n_ts = validate(chunk, now_ms, quarantine)
            seconds_like += n_seconds
            with_ts += n_ts
            if good.num_rows == 0:
                continue
            rows = spill_rows(good.table, base + rows_in - n + np.flatnonzero(good.mask),
                              keep_text)
            spill.add(rows)
            valid += rows.num_rows
        spill.close()
        reasons = dict(quarantine.reasons)
    release_memory()
    result = {"part": asdict(part), "rows_in": rows_in, "valid": valid, "lines": lines,
              "seconds_like": seconds_like, "with_timestamp": with_ts, "reasons": reasons,
              "seconds": round(time.perf_counter() - start, 3), "node": where()}
    write_json(folder / DONE, result)
    return result


def first_products(path: Path) -> pa.Array:
    """The distinct products of the first block of a reviews file (a few thousand): enough to
    see metadata of another category before the whole input is read. Read with the text (one
    block: ~0.04 s more) so that this process, which reads no other reviews, does not load the
    compiled reader of :mod:`.fastjson` for it (~1 s)."""
    chunks = read_reviews(path, schema=READ_SCHEMA)
    try:
        for chunk in chunks:
            return pc.unique(chunk.table.column("parent_asin").drop_null())
    finally:
        chunks.close()
    return pa.array([], pa.string())


def spill_file(work: Path, part: int, n_buckets: int, bucket: int) -> Path:
    return part_dir(work, part) / f"n{n_buckets}" / f"{bucket:05d}{SPILL_SUFFIX}"


def regroup_part(work: str, part: int, old: int, new: int, keep_text: bool = False) -> str:
    """Re-spill one part's rows from ``old`` buckets into ``new`` ones; returns the node."""
    folder = part_dir(Path(work), part)
    marker = folder / f"regrouped-n{new}.json"
    if marker.is_file():
        return where()
    shutil.rmtree(folder / f"n{new}", ignore_errors=True)
    spill = Spill(folder, new, spill_schema(keep_text))
    for b in range(old):
        src = spill_file(Path(work), part, old, b)
        if src.exists():
            for rows in spill_batches(src):
                spill.add(rows)
    spill.close()
    write_json(marker, {"from": old, "to": new})
    shutil.rmtree(folder / f"n{old}", ignore_errors=True)
    return where()


def finish_bucket(work: str, bucket: int, n_parts: int, n_buckets: int,
                  keep_text: bool = False) -> dict[str, Any]:
    """Sort, deduplicate and write one bucket from every part's spill (in part order) to
    ``work/reviews/bucket=NNNNN/part-0.parquet``; a bucket finished before is kept. Once its
    ``.json`` is written its spill is deleted (in a thread: the next task starts meanwhile), so a
    finished bucket's output is the only copy of its rows: the ingest takes the reviews back into
    ``work`` when it was killed after installing them (``_reclaim`` in the step)."""
    root = Path(work)
    stats_path = root / "buckets" / f"{bucket:05d}.json"
    out = root / "reviews" / f"bucket={bucket:05d}" / "part-0.parquet"
    if stats_path.is_file():
        if out.is_file() and products_file(root, bucket).is_file():
            return dict(read_json(stats_path), skipped=True)
        raise RunError(
            f"bucket {bucket} of the unfinished ingest in {root} was written, and its spill "
            f"deleted, but {out.relative_to(root)} is gone; remove {root} to ingest again from "
            "the start")
    sources = _spilled(root, bucket, n_parts, n_buckets)
    try:
        tables = [read_spill(s) for s in sources]
    except FileNotFoundError:
        # Deleted by another run of this same task that finished the bucket meanwhile (a worker
        # Dask took for lost can still be running it): that run's output stands.
        if stats_path.is_file() and out.is_file():
            return dict(read_json(stats_path), skipped=True)
        gone = [str(s.relative_to(root)) for s in sources if not s.exists()]
        raise RunError(
            f"the spill of bucket {bucket} of the unfinished ingest in {root} is incomplete "
            f"({', '.join(gone)} gone); remove {root} to ingest again from the start") from None
    table = pa.concat_tables(tables) if tables else spill_schema(keep_text).empty_table()
    del tables
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        stats, products = write_bucket(table, tmp)
    del table
    with atomic_path(products_file(root, bucket)) as tmp:
        pq.write_table(pa.table({"parent_asin": products}), tmp)
    release_memory()
    result = {**asdict(stats), "bucket": bucket, "node": where()}
    write_json(stats_path, result)
    _in_background(_delete, sources)
    return result


def _spilled(root: Path, bucket: int, n_parts: int, n_buckets: int) -> list[Path]:
    """The spill files ``bucket`` is made of, in part order: of every part whose spill lists the
    bucket (:data:`~hpcpipe.steps.ingest.buckets.SPILLED`). A listed file that is gone is then
    an error, not a bucket without those rows."""
    files = []
    for p in range(n_parts):
        path = spill_file(root, p, n_buckets, bucket)
        listed = path.parent / SPILLED
        if listed.is_file():
            if bucket in read_json(listed):
                files.append(path)
        elif path.exists():  # a spill closed before the list was written (an older version)
            files.append(path)
    return files


_BACKGROUND: ThreadPoolExecutor | None = None


def _in_background(fn: Any, *args: Any) -> None:
    """``fn(*args)`` in this process's one background thread, in the order given."""
    global _BACKGROUND
    if _BACKGROUND is None:
        _BACKGROUND = ThreadPoolExecutor(1, thread_name_prefix="hpcpipe-delete")
    _BACKGROUND.submit(fn, *args)


def _delete(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)  # the step may have removed the whole work folder first


def merge_quarantine(work: Path, parts: list[Part], results: dict[int, dict[str, Any]],
                     quarantine: Quarantine) -> None:
    """Every part's quarantine into ``quarantine`` in input order, JSON line numbers counted
    from the file's first line (a byte-range part numbers its lines from its own start)."""
    offset = 0
    previous = ""
    for part in parts:
        if part.path != previous:
            offset, previous = 0, part.path
        src = part_dir(work, part.index) / "quarantine.jsonl"
        json_part = part.row_groups is None and not part.whole_file
        if src.exists():
            with open(src, encoding="utf-8") as f:
                for text in f:
                    entry = json.loads(text)
                    line = entry["line"] + offset if json_part else entry["line"]
                    quarantine.add(entry["source"], line, entry["reason"], entry["raw"])
        offset += results[part.index]["lines"]


def products_file(work: Path, bucket: int) -> Path:
    """Where :func:`finish_bucket` lists the distinct products of ``bucket``."""
    return Path(work) / "buckets" / f"{bucket:05d}.products.parquet"


def bucket_products(work: Path, n_buckets: int) -> pa.Array:
    """Every reviewed product once: the finished buckets' lists, which cannot overlap."""
    lists = [pq.read_table(products_file(work, b)).column(0) for b in range(n_buckets)]
    return (pa.chunked_array([c for col in lists for c in col.chunks], pa.string())
            .combine_chunks())
