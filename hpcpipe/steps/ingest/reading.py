"""Reading the input: reviews in chunks of Arrow rows, and the product metadata.

Reviews are streamed in blocks (~16 MB of JSON lines, or ~1M parquet rows). A JSON block of
plain review lines is read straight into its columns by :mod:`.fastjson` (compiled with numba;
it declines any block it cannot read without doubt). Any other JSON block is decoded by msgspec
in one call into typed records of only the fields ingest reads (the others, most of the bytes,
are skipped without being built; the text, when only its length is kept, is left as raw JSON and
measured for the whole block by :mod:`jsontext`). That call skips any whitespace between values,
newlines included, so its rows are taken as the block's lines only if there are as many and
every newline sits between a ``}`` and a ``{`` (:func:`_one_object_a_line`): otherwise two
objects on one line could stand in for a blank line elsewhere. Any other block (a line refused,
blank, or not exactly one JSON value) is decoded again a line at a time, and a refused line gets
a reason in words (:func:`_diagnose`). JSON lines, gzipped or not (gzip inflated by ISA-L), and
parquet give the same :class:`Chunk`.

Why msgspec and not ``pyarrow.json``: on realistic reviews (~650 bytes a line, 1M of them, one
thread) decoding and building the columns took 1.55 s against pyarrow's 2.41 s for its parse and
UTF-8 check (a whole part: 0.74x the CPU), and pyarrow 26 crashes the process
(SIGSEGV) on a block whose only line is ``null``. What a line means is msgspec's reading of JSON
(RFC 8259): strict types (``"5"`` is not a number, ``1.0`` not an integer), UTF-8 checked in
every string it reads, a repeated key keeps its last value (as Python's ``json``; pyarrow
refused the line), and the fields it skips are checked as JSON but not range-checked (a number
like ``1E400`` in a field ingest does not read is no reason to refuse a review).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import zlib
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np
import pandas as pd  # type: ignore[import-untyped]
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from isal import igzip, isal_zlib

from hpcpipe.errors import InputError
from hpcpipe.files import atomic_path
from hpcpipe.steps.ingest.inputs import bad_parquet, file_kind, truncated
from hpcpipe.steps.ingest.jsontext import NotText, byte_positions, string_lengths

log = logging.getLogger(__name__)

REQUIRED: tuple[str, ...] = ("rating", "parent_asin", "user_id", "timestamp")
READ_SCHEMA = pa.schema([
    ("rating", pa.float64()), ("title", pa.string()), ("text", pa.string()),
    ("asin", pa.string()), ("parent_asin", pa.string()), ("user_id", pa.string()),
    ("timestamp", pa.int64()), ("helpful_vote", pa.int64()), ("verified_purchase", pa.bool_()),
])
#: Without the review's words (not kept unless ``ingest.keep_text``): the title is skipped, the
#: text read for its length in characters only (JSON lines; a parquet file's text column is read
#: and measured).
READ_SCHEMA_LENGTHS = pa.schema(
    [f for f in READ_SCHEMA if f.name not in ("title", "text")] + [("text_chars", pa.int32())])
_Int64 = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
META_SCHEMA = pa.schema([("parent_asin", pa.string()), ("title", pa.string()),
                         ("main_category", pa.string()), ("store", pa.string())])

#: Below glibc's largest mmap threshold (32 MB): freed blocks are reused from the heap instead
#: of being mapped and zeroed anew by the kernel each time (32 MB blocks spent a third of the
#: reading in the kernel).
BLOCK_BYTES = 16 << 20
PARQUET_BATCH_ROWS = 1 << 20
RAW_CHARS = 500
_NEWLINE = ord("\n")


@dataclass
class Chunk:
    """Parsed rows of one block/batch. ``table`` has the schema asked for (READ_SCHEMA or
    READ_SCHEMA_LENGTHS); row i came from ``lines[i]``."""

    table: pa.Table
    source: str
    lines: np.ndarray  # line number (JSON, 1-based) or row index (parquet) of each row
    raws: Any  # callable(i) -> raw text of row i
    refused: list[tuple[int, str, str]]  # (line, reason, raw) of lines the parser refused
    pre_reason: np.ndarray | None = None  # per-row reason found while coercing types, or None
    next_line: int = 0  # JSON: the line number after this chunk's block





def read_reviews(path: Path, start: int = 0, stop: int | None = None,
                 row_groups: Sequence[int] | None = None, first_row: int = 0,
                 schema: pa.Schema = READ_SCHEMA,
                 gz_index: str | None = None) -> Generator[Chunk, None, None]:
    """Chunks of a reviews file, or of a part of it, with the fields of ``schema`` (READ_SCHEMA
    or READ_SCHEMA_LENGTHS); the next one is read and parsed in a thread meanwhile. A part of a
    JSON lines file is the bytes ``start:stop`` (both at line starts; line numbers count from the
    part's first line), of the uncompressed stream for a gzipped one, which needs its
    ``gz_index`` (:func:`build_gz_index`); of a parquet file the ``row_groups``, whose first row
    is row ``first_row`` of the file."""
    return _prefetched(_read_reviews_here(path, start, stop, row_groups, first_row, schema,
                                          gz_index))


def _prefetched(chunks: Iterator[Chunk]) -> Generator[Chunk, None, None]:
    # Reading/parsing (Arrow, GIL released) of chunk k+1 overlaps checking and spilling chunk k.
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(next, chunks, None)
        while True:
            chunk = nxt.result()
            if chunk is None:
                return
            nxt = pool.submit(next, chunks, None)
            yield chunk


def _read_reviews_here(path: Path, start: int, stop: int | None,
                       row_groups: Sequence[int] | None, first_row: int,
                       schema: pa.Schema, gz_index: str | None) -> Iterator[Chunk]:
    kind, _ = file_kind(path)
    if kind == "parquet":
        yield from _read_parquet_reviews(path, row_groups, first_row, schema)
        return
    first_line = 1
    for block in _json_blocks(path, start, stop, gz_index):
        parsed, refused = _parse_json_block(block, schema)
        refused = [(first_line + line, reason, raw) for line, reason, raw in refused]
        lines = first_line + parsed.line_index
        first_line += parsed.lines
        yield Chunk(parsed.table, str(path), lines, _json_raws(block, parsed), refused,
                    next_line=first_line)


def _open_json(path: Path, gz_index: str | None = None) -> io.BufferedIOBase:
    _, gz = file_kind(path)
    if gz and gz_index:
        return _open_indexed_gz(path, gz_index)
    if gz:
        # ISA-L's inflate: the same gzip format and errors, 2-3x the speed of zlib's.
        return igzip.IGzipFile(path, "rb")
    return open(path, "rb")  # noqa: SIM115 (the caller closes it)


def _open_indexed_gz(path: Path, gz_index: str | None = None, threads: int = 1) -> Any:
    """``path`` through rapidgzip, which can seek in the uncompressed stream once it has the
    index of its deflate blocks (``gz_index``; without it the index is built while reading).
    The caller must close it (rapidgzip's threads abort the interpreter at exit otherwise)."""
    import rapidgzip  # type: ignore[import-not-found]

    f = rapidgzip.open(str(path), parallelization=threads)
    if gz_index:
        try:
            f.import_index(gz_index)
        except BaseException:
            f.close()
            raise
    return f


#: What a gzip reader raises on a truncated or corrupt file: the standard library's and ISA-L's
#: errors; rapidgzip says ValueError or RuntimeError (read on a file object only).
_GZIP_ERRORS = (EOFError, zlib.error, isal_zlib.error, gzip.BadGzipFile)
_INDEXED_GZIP_ERRORS = (*_GZIP_ERRORS, ValueError, RuntimeError)


def build_gz_index(path: Path, out: Path, threads: int) -> int:
    """Read the gzipped ``path`` through once with rapidgzip (``threads`` decompressing) and write
    the index of its deflate blocks to ``out`` (temp name, renamed when complete); return the
    uncompressed size. A truncated or corrupt file is refused as when it is read."""
    with _open_indexed_gz(path, None, threads) as f:
        try:
            while f.read(BLOCK_BYTES):
                pass
        except _INDEXED_GZIP_ERRORS as exc:  # type: ignore[misc]
            raise truncated(path, exc) from None
        # rapidgzip (0.16) ends a stream cut short at its last whole deflate block without an
        # error; a whole file is read to its last byte (its last member's trailer).
        used, total = int(f.tell_compressed()), 8 * path.stat().st_size
        if used != total:
            raise truncated(path, EOFError(
                f"the compressed data ends at byte {used // 8} of {total // 8}"))
        size = int(f.tell())
        with atomic_path(out) as tmp:
            f.export_index(str(tmp))
    return size


def gz_line_starts(path: Path, gz_index: str, size: int, part_bytes: int) -> list[int]:
    """The uncompressed stream's line starts at every ``part_bytes`` (:func:`line_starts`)."""
    with _open_indexed_gz(path, gz_index) as f:
        return line_starts(f, size, part_bytes)


def line_starts(f: Any, size: int, part_bytes: int) -> list[int]:
    """0, the first line start at or after every ``part_bytes`` of the ``size`` bytes of the
    seekable ``f``, and -1 (the end)."""
    bounds = [0]
    at = part_bytes
    while at < size:
        f.seek(at - 1)
        skipped = 0
        while True:  # the line that crosses ``at`` belongs to the part before
            piece = f.read(1 << 20)
            nl = piece.find(b"\n")
            if nl >= 0 or not piece:
                break
            skipped += len(piece)
        if nl < 0:
            break
        cut = at - 1 + skipped + nl + 1
        if cut >= size:
            break
        if cut > bounds[-1]:
            bounds.append(cut)
        at = cut + part_bytes
    return [*bounds, -1]


@dataclass
class _Block:
    """Whole lines of a JSON lines file, ~BLOCK_BYTES of them, as read: ``head``, the line the
    previous read cut (completed; or the read's first line), then ``body``, a view of the read's
    whole lines after it; ``at_eof``: the file's last lines.

    Not joined into one bytes object: that copy of every block (with the page faults of a fresh
    16 MB) cost 0.3 s of CPU per million realistic reviews; the two pieces are decoded one after
    the other, and joined only for a block whose lines are read one at a time."""

    head: bytes
    body: memoryview
    at_eof: bool
    _whole: bytes | None = None

    def pieces(self) -> list[bytes | memoryview]:
        return [p for p in (self.head, self.body) if len(p)]

    def whole(self) -> bytes:
        """The lines as one bytes object (joined when first asked)."""
        if self._whole is None:
            self._whole = b"".join((self.head, self.body))
        return self._whole


def _json_blocks(path: Path, start: int = 0, stop: int | None = None,
                 gz_index: str | None = None) -> Iterator[_Block]:
    """Blocks of whole lines of the whole file or of the (uncompressed) bytes ``start:stop``; the
    next block is read (and decompressed) in a thread while the caller works on this one."""
    f = _open_json(path, gz_index)
    errors = _INDEXED_GZIP_ERRORS if gz_index else _GZIP_ERRORS
    if start:
        f.seek(start)
    left = [None if stop is None else stop - start]

    def read() -> bytes:
        try:
            if left[0] is None:
                return f.read(BLOCK_BYTES)
            data = f.read(min(BLOCK_BYTES, left[0]))
            left[0] -= len(data)
            return data
        # isal's stub declares its error class as an instance of Exception.
        except errors as exc:  # type: ignore[misc]
            raise truncated(path, exc) from None

    try:
        with ThreadPoolExecutor(1) as pool:
            nxt: Future = pool.submit(read)
            carry = b""
            while True:
                data = nxt.result()
                if not data:
                    if carry:
                        yield _Block(carry, memoryview(b""), True)
                    return
                nxt = pool.submit(read)
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block: keep reading
                    carry += data
                    continue
                first = data.find(b"\n") + 1
                view = memoryview(data)
                block = _Block(b"".join((carry, view[:first])), view[first:cut], False)
                carry = data[cut:]
                yield block
    finally:
        f.close()


@dataclass
class _Parsed:
    table: pa.Table
    line_index: np.ndarray  # 0-based line within the block of each row
    lines: int  # how many lines the block holds
    starts: np.ndarray | None = None  # where each line starts and ends; None: not needed yet
    ends: np.ndarray | None = None


def _line_count(block: bytes | memoryview, newlines: np.ndarray) -> int:
    return len(newlines) + (len(block) > 0 and block[-1] != 10)


def _one_object_a_line(block: bytes | memoryview, newlines: np.ndarray) -> bool:
    """Whether every newline of ``block`` ends a line whose last byte is ``}`` (or ``}\\r``) and,
    unless it ends the block, starts one whose first is ``{``. In a block that decodes as JSON
    values such a newline can only separate two of them (inside a value, ``{`` cannot follow a
    value), so with as many values as lines each line holds exactly one."""
    if not len(newlines):
        return True
    a = np.frombuffer(block, np.uint8)
    if newlines[0] == 0:
        return False
    before = a[newlines - 1]
    cr = before == 13
    if cr.any():
        if (newlines[cr] < 2).any():
            return False
        before = np.where(cr, a[np.maximum(newlines - 2, 0)], before)
    inner = newlines[newlines < len(a) - 1]
    return bool((before == 125).all() and (a[inner + 1] == 123).all())


def _line_spans(block: bytes) -> tuple[np.ndarray, np.ndarray]:
    nl = byte_positions(block, _NEWLINE)
    starts = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl, [len(block)]])
    if starts[-1] == len(block):  # the block ends with a newline: no line after it
        starts, ends = starts[:-1], ends[:-1]
    return starts, ends


class _ReviewFields(msgspec.Struct, gc=False):
    """A review line's fields that ingest reads, but its words (others are checked as JSON, not
    built): any may be missing or null (validation says which must not be), a value of another
    type refuses the line, an integer must fit in 64 bits."""

    rating: float | None = None
    asin: str | None = None
    parent_asin: str | None = None
    user_id: str | None = None
    timestamp: _Int64 | None = None
    helpful_vote: _Int64 | None = None
    verified_purchase: bool | None = None


class _Review(_ReviewFields, gc=False):
    text: str | None = None


class _ReviewWithTitle(_Review, gc=False):
    title: str | None = None


class _ReviewTextRaw(_ReviewFields, gc=False):
    """The text as its raw JSON (checked as JSON, not built): only its length is kept, counted
    for a whole block by :func:`jsontext.string_lengths`, which refuses what is not a string or
    not UTF-8 (the block is then read a line at a time with :class:`_Review`)."""

    text: msgspec.Raw = msgspec.Raw(b"null")


class _Meta(msgspec.Struct, gc=False):
    parent_asin: str | None = None
    title: str | None = None
    main_category: str | None = None
    store: str | None = None


_DECODERS: dict[tuple[str, ...], msgspec.json.Decoder[Any]] = {
    tuple(READ_SCHEMA.names): msgspec.json.Decoder(_ReviewWithTitle),
    tuple(READ_SCHEMA_LENGTHS.names): msgspec.json.Decoder(_Review),
    tuple(META_SCHEMA.names): msgspec.json.Decoder(_Meta)}
#: The decoder of a block's fast path where it differs (the text measured, not built).
_BLOCK_DECODERS: dict[tuple[str, ...], msgspec.json.Decoder[Any]] = {
    tuple(READ_SCHEMA_LENGTHS.names): msgspec.json.Decoder(_ReviewTextRaw)}


def _table_of(rows: list[Any], schema: pa.Schema, raw_text: bool = False) -> pa.Table:
    """Decoded lines as a table of ``schema``; ``text_chars`` is the text's length in
    characters (code points, as ``pyarrow.compute.utf8_length``), of the text as a string or,
    with ``raw_text``, as its raw JSON (:func:`jsontext.string_lengths`: raises NotText)."""
    cols = []
    for field in schema:
        if field.name != "text_chars":
            cols.append(pa.array(list(map(attrgetter(field.name), rows)), field.type))
        elif raw_text:
            cols.append(string_lengths(list(map(attrgetter("text"), rows))))
        else:
            cols.append(pa.array([None if t is None else len(t)
                                  for t in map(attrgetter("text"), rows)], pa.int32()))
    return pa.table(cols, schema=schema)


def _parse_json_block(block: _Block, schema: pa.Schema
                      ) -> tuple[_Parsed, list[tuple[int, str, str]]]:
    """Parse a block's lines into a table of ``schema`` (READ_SCHEMA, READ_SCHEMA_LENGTHS or
    META_SCHEMA). READ_SCHEMA_LENGTHS is first offered to :mod:`.fastjson`, which reads a block of
    plain review lines straight into columns (or declines it). Fast path: one msgspec call for
    each of the block's pieces, a row for every line, and line i is row i (module doc).
    Otherwise (a line refused, blank, or not exactly one JSON value) the block is decoded a line
    at a time: blank lines are skipped, and each refused line gets a reason in words
    (:func:`_diagnose`)."""
    if schema.names == READ_SCHEMA_LENGTHS.names:
        # Imported here: only a process that reads reviews loads numba (~0.5 s).
        from hpcpipe.steps.ingest import fastjson

        tables = []
        for piece in block.pieces():
            table = fastjson.read_lines(piece, schema)
            if table is None:  # declined: the rest of the block is not read twice
                break
            tables.append(table)
        else:
            if tables:
                table = pa.concat_tables(tables).combine_chunks()
                return _Parsed(table, np.arange(table.num_rows), table.num_rows), []
    decoder = _DECODERS[tuple(schema.names)]
    fast = _BLOCK_DECODERS.get(tuple(schema.names), decoder)
    rows: list[Any] = []
    try:
        for piece in block.pieces():
            newlines = byte_positions(piece, _NEWLINE)
            decoded = fast.decode_lines(piece)
            if (len(decoded) != _line_count(piece, newlines)
                    or not _one_object_a_line(piece, newlines)):
                break
            rows += decoded
        else:
            table = _table_of(rows, schema, raw_text=fast is not decoder)
            return _Parsed(table, np.arange(len(rows)), len(rows)), []
    # ValidationError (a value of the wrong type) is a DecodeError too.
    except (msgspec.DecodeError, NotText):
        pass
    whole = block.whole()
    starts, ends = _line_spans(whole)
    rows, index = [], []
    refused: list[tuple[int, str, str]] = []
    unterminated_last = block.at_eof and not whole.endswith(b"\n")
    for i, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        raw = whole[lo:hi]
        if not raw.strip():
            continue  # a blank line
        try:
            rows.append(decoder.decode(raw))
            index.append(i)
        except msgspec.DecodeError:
            is_last = unterminated_last and i == len(starts) - 1
            refused.append((i, _diagnose(raw, is_last, schema.names),
                            raw.decode("utf-8", "backslashreplace")))
    return (_Parsed(_table_of(rows, schema), np.array(index, np.int64), len(starts), starts,
                    ends), refused)


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
    """Why the decoder refused one line, in words a person can act on."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "non-UTF-8 bytes"
    try:
        obj = json.loads(text)  # NaN and Infinity pass here, not in JSON: caught below
    except ValueError:
        return "truncated last line" if is_last else "malformed JSON"
    if not isinstance(obj, dict):
        return "not a JSON object"
    read = set(fields) | ({"text"} if "text_chars" in fields else set())
    for key, (types, reason) in _TYPE_CHECKS.items():
        value = obj.get(key) if key in read else None
        if value is None:
            continue
        if isinstance(value, bool) and bool not in types:
            return reason
        if not isinstance(value, types):
            return reason
        if isinstance(value, float) and not math.isfinite(value):
            return reason  # only a number field gets here: a float is no integer
        if isinstance(value, int) and not isinstance(value, bool) and not (
                -(1 << 63) <= value < (1 << 63)):
            return f"{key} does not fit in 64 bits"
    return "unreadable JSON line"


def _json_raws(block: _Block, parsed: _Parsed) -> Any:
    def raw(i: int) -> str:
        whole = block.whole()
        if parsed.starts is None or parsed.ends is None:  # found once, for a refused row
            parsed.starts, parsed.ends = _line_spans(whole)
        k = parsed.line_index[i]
        return whole[parsed.starts[k]:parsed.ends[k]][:RAW_CHARS * 4].decode("utf-8", "replace")
    return raw


def _read_parquet_reviews(path: Path, row_groups: Sequence[int] | None = None,
                          first_row: int = 0, schema: pa.Schema = READ_SCHEMA
                          ) -> Iterator[Chunk]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise bad_parquet(path, exc) from None
    names = set(pf.schema_arrow.names)
    absent = [c for c in REQUIRED if c not in names]
    if absent:
        raise InputError(
            f"{path} has no column(s) {', '.join(absent)}; reviews need rating, parent_asin, "
            "user_id and timestamp (Amazon Reviews'23 layout)")
    measured = "text_chars" in schema.names  # read the text, keep its length
    read_as = pa.schema([pa.field("text", pa.string()) if f.name == "text_chars" else f
                         for f in schema]) if measured else schema
    cols = [c for c in read_as.names if c in names]
    base = first_row
    batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=cols,
                              row_groups=None if row_groups is None else list(row_groups))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise bad_parquet(path, exc) from None
        table, pre_reason = _coerce_parquet(pa.Table.from_batches([batch]), read_as)
        if measured:
            chars = pc.utf8_length(table.column("text")).cast(pa.int32())
            table = table.set_column(read_as.get_field_index("text"), "text_chars", chars)
        n = table.num_rows

        def raw(i: int, batch: pa.RecordBatch = batch) -> str:
            return json.dumps(batch.slice(i, 1).to_pylist()[0], default=str)

        yield Chunk(table, str(path), np.arange(base, base + n), raw, [], pre_reason)
        base += n


def _coerce_parquet(table: pa.Table, schema: pa.Schema = READ_SCHEMA
                    ) -> tuple[pa.Table, np.ndarray | None]:
    """Cast parquet columns to ``schema``; values that cannot be cast get a per-row reason."""
    pre: np.ndarray | None = None
    cols = {}
    for field in schema:
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
    return pa.table(cols, schema=schema), pre



# ---------------------------------------------------------------------------------------------
# Product metadata.


def write_metadata(path: Path, out: Path) -> int:
    """The metadata's parent_asin, title, main_category and store, rows with a parent_asin, in
    file order, to the parquet file ``out``, a block at a time: memory stays that of a block
    however many products there are (Amazon Reviews'23 lists 48M). Returns the rows written;
    the ingest then keeps the first row of each product. Raises InputError for a
    file without parent_asin or without products."""
    kind, _ = file_kind(path)
    parsed = rows = bad = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, META_SCHEMA) as writer:
        for table, refused in _metadata_blocks(path, kind):
            bad += refused
            parsed += table.num_rows
            table = table.filter(pc.is_valid(table.column("parent_asin")))
            if table.num_rows:
                writer.write_table(table)
                rows += table.num_rows
    if bad:
        log.warning("metadata %s: %d unreadable lines skipped", path, bad)
    if parsed and not rows and kind != "parquet":
        raise InputError(
            f"metadata file {path} has no parent_asin field; is it the product metadata "
            "file (meta_*.jsonl) that goes with the reviews?")
    if rows == 0:
        raise InputError(f"metadata file {path} has no products; give the metadata file "
                         "that goes with the reviews")
    return rows


def _metadata_blocks(path: Path, kind: str) -> Iterator[tuple[pa.Table, int]]:
    """(rows with META_SCHEMA, lines refused) of each block or batch of a metadata file."""
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
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=cols):
                yield _conform(pa.Table.from_batches([batch]), META_SCHEMA), 0
        except (pa.ArrowException, OSError) as exc:
            raise bad_parquet(path, exc) from None
        return
    for block in _json_blocks(path):
        t, refused = _parse_json_block(block, META_SCHEMA)
        yield t.table, len(refused)


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
