"""The input files as a whole: which ones, of what kind, how big, and synthetic ones when none
are configured. Errors here name the file and say how to fix it."""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from hpcpipe.config import DataConfig, RunConfig
from hpcpipe.errors import InputError
from hpcpipe.files import write_json
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.provenance import fingerprint
from hpcpipe.steps.done import already_done

log = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


def configured_inputs(layout: RunLayout, cfg: RunConfig) -> tuple[list[Path], Path]:
    """(reviews files, metadata file) of a run: ``cfg.data``'s, or synthetic ones in
    ``layout.raw`` when ``cfg.data.reviews`` is empty."""
    if cfg.data.reviews:
        if not cfg.data.metadata:
            raise InputError("data.metadata is not set: ingest needs the product metadata file "
                             "that goes with data.reviews; set data.metadata=PATH")
        return [Path(p) for p in cfg.data.reviews], Path(cfg.data.metadata)
    made = synthesize_once(layout.raw, cfg.data)
    return [Path(made["reviews"])], Path(made["metadata"])


def synthesize_once(raw_dir: Path, data: DataConfig) -> dict[str, Any]:
    """Synthetic input in ``raw_dir`` for ``data`` (synth_reviews, synth_products, seed), made once.

    A record ``raw_dir/synth.json`` (written after both files) says what was made from what
    request, with its fingerprint; if the request is the same and the files exist, they are
    reused. Returns the dict of ``synth.write_synthetic`` plus ``made_from`` and ``fingerprint``.
    """
    from hpcpipe.steps import synth

    raw_dir = Path(raw_dir)
    marker = raw_dir / "synth.json"
    made_from = {"request": {"n_reviews": data.synth_reviews, "n_products": data.synth_products,
                             "seed": data.seed, "format": "jsonl.gz"}}
    done = already_done(marker, made_from, files=("reviews", "metadata"),
                        what="the synthetic input")
    if done is not None:
        log.info("reusing synthetic input in %s (%d reviews, seed %d)", raw_dir,
                 data.synth_reviews, data.seed)
        return done
    log.info("no input configured: synthesizing %d reviews (seed %d) into %s",
             data.synth_reviews, data.seed, raw_dir)
    made = synth.write_synthetic(raw_dir, data.synth_reviews, seed=data.seed,
                                 n_products=data.synth_products, fmt="jsonl.gz")
    made.update(made_from=made_from, fingerprint=fingerprint(made_from))
    write_json(marker, made)
    return made


def checked_inputs(reviews_paths: Sequence[Path | str], metadata_path: Path | str | None
                   ) -> tuple[list[Path], Path]:
    """The paths as ``Path``s, once each exists, is a file and has a name ingest can read."""
    reviews = [Path(p) for p in reviews_paths]
    if not reviews:
        raise InputError("no reviews files given; set data.reviews to one or more files")
    if metadata_path is None:
        raise InputError("no product metadata file given; set data.metadata=PATH")
    metadata = Path(metadata_path)
    for p in [*reviews, metadata]:
        _check_input_path(p)
    return reviews, metadata


def file_kind(path: Path) -> tuple[str, bool]:
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
    file_kind(path)


#: Bytes hashed at each end of an input file: a file replaced by one of the same size and time
#: (``cp -p``, ``rsync -a`` of a regenerated file) is still seen as changed, for two small reads.
SAMPLE_BYTES = 64 << 10


def describe(path: Path, role: str) -> dict[str, Any]:
    """What ingest records of an input file, so that a changed file means "not done"."""
    digest = hashlib.sha256()
    try:
        st = path.stat()
        with open(path, "rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            if st.st_size > SAMPLE_BYTES:
                f.seek(max(SAMPLE_BYTES, st.st_size - SAMPLE_BYTES))
                digest.update(f.read(SAMPLE_BYTES))
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror}); check that the file and its "
                         "folder are readable by you") from None
    return {"role": role, "path": str(path.resolve()), "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns, "sample": digest.hexdigest()[:16]}


def truncated(path: Path, exc: BaseException) -> InputError:
    return InputError(
        f"{path} is truncated or corrupt: the gzip stream ends early or is damaged ({exc}). "
        "The file was probably cut short while copying or downloading; fetch it again")


def bad_parquet(path: Path, exc: BaseException) -> InputError:
    return InputError(
        f"{path} is not a readable parquet file (truncated or corrupt: {exc}). Copy or export it "
        "again")


def estimate_rows(path: Path) -> int:
    """Rows in a reviews file: exact for parquet, from a 4 MB sample for JSON lines."""
    kind, gz = file_kind(path)
    if kind == "parquet":
        try:
            return int(pq.ParquetFile(path).metadata.num_rows)
        except (pa.ArrowException, OSError) as exc:
            raise bad_parquet(path, exc) from None
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4 << 20 if not gz else 1 << 20)
    if gz:
        d = zlib.decompressobj(wbits=31)
        try:
            data = d.decompress(head, 64 << 20)
        except zlib.error as exc:
            raise truncated(path, exc) from None
        used = len(head) - len(d.unused_data) - len(d.unconsumed_tail)
        ratio = len(data) / max(1, used)
        head, size = data, int(size * ratio)
    lines = max(1, head.count(b"\n"))
    return max(1, round(size * lines / max(1, len(head))))
