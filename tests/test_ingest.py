"""hpcpipe.steps.ingest on real files in tmp_path: counts, quarantine reasons, whole-input errors."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from hpcpipe.config import IngestConfig, RunConfig
from hpcpipe.errors import InputError
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.metrics import MetricsWriter, read_metrics
from hpcpipe.steps.ingest import REASON_SECONDS, _write_products, bucket_count, bucket_of, ingest, run
from hpcpipe.steps.ingest.reading import META_SCHEMA
from hpcpipe.steps.synth import write_synthetic

TS = 1_600_000_000_000  # 2020-09-13, in ms


def review(i: int, **over) -> dict:
    r = {"rating": 4.0, "title": "ok", "text": f"text {i}", "images": [], "asin": f"A{i % 7}",
         "parent_asin": f"P{i % 7}", "user_id": f"U{i}", "timestamp": TS + i * 1000,
         "helpful_vote": 1, "verified_purchase": True}
    r.update(over)
    return {k: v for k, v in r.items() if v is not _DROP}


_DROP = object()


def write_lines(path, lines: list[bytes | str | dict], newline_at_end: bool = True) -> None:
    out = []
    for x in lines:
        if isinstance(x, dict):
            x = json.dumps(x)
        out.append(x.encode() if isinstance(x, str) else x)
    data = b"\n".join(out) + (b"\n" if newline_at_end else b"")
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


def write_meta(path, ids) -> None:
    write_lines(path, [{"parent_asin": p, "title": f"Thing {p}", "main_category": "Toys",
                        "store": "S", "categories": ["a", "b"]} for p in ids])


def quarantine(out) -> list[dict]:
    return [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]


def cfg(rows: int = 500_000) -> IngestConfig:
    return IngestConfig(target_bucket_rows=rows)


def test_run_on_synthetic_data_and_rerun_skips(tmp_path):
    layout = RunLayout(tmp_path / "run")
    config = RunConfig()
    config.data.synth_reviews = 20_000
    config.ingest.target_bucket_rows = 6_000
    metrics = MetricsWriter(layout.metrics, "ingest")
    m = run(layout, config, metrics)
    assert (layout.raw / "reviews.jsonl.gz").is_file() and (layout.raw / "synth.json").is_file()
    assert m["rows_in"] == 20_000
    assert m["rows_in"] == m["rows_out"] + m["quarantined"] + m["duplicates"]
    assert m["n_buckets"] == 4
    out = layout.ingest
    tables = []
    for b in range(4):
        t = pq.read_table(out / "reviews" / f"bucket={b:05d}" / "part-0.parquet")
        assert t.schema.names == ["parent_asin", "asin", "user_id", "timestamp", "rating",
                                  "text_chars", "helpful_vote", "verified_purchase"]
        assert t.schema.field("rating").type == pa.float32()
        assert t.schema.field("text_chars").type == pa.int32()
        keys = list(zip(t.column("parent_asin").to_pylist(), t.column("timestamp").to_pylist(),
                        strict=True))
        assert keys == sorted(keys)
        assert (bucket_of(t.column("parent_asin"), 4) == b).all()
        tables.append(t)
    assert sum(t.num_rows for t in tables) == m["rows_out"]
    products = pq.read_table(out / "products.parquet")
    assert products.num_rows == m["products"]
    assert m["products_without_metadata"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["last_week"] and manifest["min_timestamp"] <= manifest["max_timestamp"]
    summary = [r for r in read_metrics(layout.metrics) if r["kind"] == "summary"]
    assert summary[-1]["rows_out"] == m["rows_out"] and summary[-1]["rows_per_s"] > 0

    raw_mtime = (layout.raw / "reviews.jsonl.gz").stat().st_mtime_ns
    again = run(layout, config, metrics)
    assert again["skipped"] is True and again["rows_out"] == m["rows_out"]
    assert (layout.raw / "reviews.jsonl.gz").stat().st_mtime_ns == raw_mtime  # synthesis reused
    assert read_metrics(layout.metrics)[-1]["skipped"] is True


def test_parquet_input_matches_jsonl_input(tmp_path):
    write_synthetic(tmp_path / "p", 8_000, seed=2, fmt="parquet")
    write_synthetic(tmp_path / "j", 8_000, seed=2, fmt="jsonl")
    mp = ingest([tmp_path / "p" / "reviews.parquet"], tmp_path / "p" / "meta.parquet",
                tmp_path / "out_p", cfg(3_000))
    mj = ingest([tmp_path / "j" / "reviews.jsonl"], tmp_path / "j" / "meta.jsonl",
                tmp_path / "out_j", cfg(3_000))
    assert mp["rows_out"] == mj["rows_out"] == 8_000 and mp["n_buckets"] == 3
    for b in range(3):
        rel = f"reviews/bucket={b:05d}/part-0.parquet"
        assert pq.read_table(tmp_path / "out_p" / rel).equals(pq.read_table(tmp_path / "out_j" / rel))


@pytest.mark.parametrize(("valid", "guessed", "target", "want"), [
    (3_000_000, 7, 500_000, 7),  # a 0.07% overestimate: 428k rows per bucket, kept
    (3_000_000, 6, 500_000, 6),
    (3_000_000, 9, 500_000, 6),  # 333k per bucket: too far off, recounted
    (3_000_000, 4, 500_000, 6),  # 750k per bucket
    (100, 3, 500_000, 1),
])
def test_a_bucket_estimate_is_kept_unless_its_buckets_are_far_off_the_target(
        valid, guessed, target, want):
    assert bucket_count(valid, guessed, target) == want


def test_an_estimate_far_off_the_valid_rows_is_redistributed_to_the_exact_count(tmp_path,
                                                                                 caplog):
    # 5000 lines -> 5 buckets expected; 3000 are refused, so 2000 valid rows need 2.
    lines = [review(i, rating=9.0 if i % 5 < 3 else 4.0) for i in range(5000)]
    write_lines(tmp_path / "r.jsonl", lines)
    write_meta(tmp_path / "m.jsonl", [f"P{i}" for i in range(7)])
    with caplog.at_level("INFO", logger="hpcpipe.steps.ingest"):
        m = ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", tmp_path / "out", cfg(1_000))
    assert "2000 valid rows need 2 buckets, not the 5 estimated" in caplog.text, caplog.text
    assert m["n_buckets"] == 2 and m["rows_out"] == 2000 and m["quarantined"] == 3000
    total = 0
    for b in range(2):
        t = pq.read_table(tmp_path / "out" / "reviews" / f"bucket={b:05d}" / "part-0.parquet")
        assert (bucket_of(t.column("parent_asin"), 2) == b).all()
        total += t.num_rows
    assert total == 2000
    assert not (tmp_path / "out" / "reviews" / "bucket=00002").exists()


def test_spill_flushed_after_every_slice_gives_the_same_output(tmp_path, monkeypatch):
    import hpcpipe.steps.ingest.buckets as buckets_module

    write_synthetic(tmp_path / "j", 8_000, seed=3, fmt="jsonl")
    paths = ([tmp_path / "j" / "reviews.jsonl"], tmp_path / "j" / "meta.jsonl")
    whole = ingest(*paths, tmp_path / "whole", cfg(3_000))
    monkeypatch.setattr(buckets_module, "SPILL_BUFFER_BYTES", 1)
    flushed = ingest(*paths, tmp_path / "flushed", cfg(3_000))
    assert whole["n_buckets"] == flushed["n_buckets"] == 3
    for b in range(3):
        rel = f"reviews/bucket={b:05d}/part-0.parquet"
        assert pq.read_table(tmp_path / "whole" / rel).equals(pq.read_table(tmp_path / "flushed" / rel))


def test_bad_rows_are_quarantined_with_reasons(tmp_path):
    future = int((time.time() + 30 * 86400) * 1000)
    lines = [review(i) for i in range(60)] + [
        '{"rating": 5.0, "parent_asin": "P1", "user_id": "x", ',  # 61 malformed
        b'{"rating": 5.0, "parent_asin": "P1", "user_id": "\xff\xfe", "timestamp": 1600000000000}',
        review(62, rating=_DROP),  # 63
        review(63, parent_asin=_DROP),
        review(64, user_id=None),
        review(65, timestamp=_DROP),
        review(66, rating="five"),
        review(67, rating=7.0),
        review(68, timestamp=-5),
        review(69, timestamp=future),  # 70
        review(70, timestamp=1_600_000_000),  # seconds
        review(5),  # 72: duplicate of line 6
        "",  # a blank line is skipped, not counted
        '[1, 2]',  # 74
        '{"rating": 4.0, "parent_asin": "P1", "user_id": "z", "timestamp": 16',  # truncated last
    ]
    src = tmp_path / "reviews.jsonl"
    write_lines(src, lines, newline_at_end=False)
    write_meta(tmp_path / "meta.jsonl", [f"P{i}" for i in range(7)])
    m = ingest([src], tmp_path / "meta.jsonl", tmp_path / "out", cfg())
    got = {q["line"]: q["reason"] for q in quarantine(tmp_path / "out")}
    assert got == {
        61: "malformed JSON", 62: "non-UTF-8 bytes", 63: "missing required field: rating",
        64: "missing required field: parent_asin", 65: "missing required field: user_id",
        66: "missing required field: timestamp", 67: "rating is not a number",
        68: "rating out of range [1, 5]", 69: "timestamp is negative",
        70: "timestamp is in the future", 71: REASON_SECONDS, 74: "not a JSON object",
        75: "truncated last line"}
    assert all(q["source"] == str(src) and q["raw"] for q in quarantine(tmp_path / "out"))
    assert m["duplicates"] == 1 and m["rows_out"] == 60 and m["quarantined"] == 13
    assert m["rows_in"] == m["rows_out"] + m["quarantined"] + m["duplicates"]
    assert m["reasons"]["malformed JSON"] == 1


def test_duplicates_keep_first(tmp_path):
    rows = [review(0, text="first"), review(1), review(0, text="second")]
    write_lines(tmp_path / "r.jsonl", rows)
    write_meta(tmp_path / "m.jsonl", ["P0", "P1"])
    m = ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", tmp_path / "out",
               IngestConfig(keep_text=True))
    t = pq.read_table(tmp_path / "out" / "reviews" / "bucket=00000" / "part-0.parquet")
    assert m["duplicates"] == 1 and "second" not in t.column("text").to_pylist()


def test_the_review_words_are_kept_only_when_asked_and_change_nothing_else(tmp_path):
    rows = [review(i, text=None if i % 9 == 0 else "é" * (i % 13)) for i in range(120)]
    write_lines(tmp_path / "r.jsonl", rows)
    write_meta(tmp_path / "m.jsonl", [f"P{i}" for i in range(7)])
    out = {}
    for keep in (False, True):
        m = ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", tmp_path / f"out-{keep}",
                   IngestConfig(target_bucket_rows=40, keep_text=keep))
        assert m["made_from"]["settings"]["ingest.keep_text"] is keep
        out[keep] = pa.concat_tables(pq.read_table(p) for p in sorted(
            (tmp_path / f"out-{keep}").glob("reviews/*/*.parquet")))
    assert "text" not in out[False].column_names and "title" not in out[False].column_names
    words = out[True]
    by_user = dict(zip(words.column("user_id").to_pylist(), words.column("text").to_pylist(),
                       strict=True))
    assert by_user == {r["user_id"]: r["text"] for r in rows}
    assert words.drop_columns(["title", "text"]).equals(out[False])
    # Characters, not bytes; a review without text has 0.
    assert out[False].column("text_chars").to_pylist() == [
        len(t or "") for t in words.column("text").to_pylist()]


def test_gz_input_and_products_without_metadata(tmp_path):
    write_lines(tmp_path / "r.jsonl.gz", [review(i) for i in range(70)])
    write_meta(tmp_path / "m.jsonl.gz", [f"P{i}" for i in range(5)])  # P5, P6 have none
    m = ingest([tmp_path / "r.jsonl.gz"], tmp_path / "m.jsonl.gz", tmp_path / "out", cfg())
    assert m["rows_out"] == 70 and m["products_without_metadata"] == 2
    products = pq.read_table(tmp_path / "out" / "products.parquet").to_pylist()
    assert len(products) == 7 and products[-1]["title"] is None


def test_whole_file_in_seconds_is_an_input_error(tmp_path):
    write_lines(tmp_path / "r.jsonl", [review(i, timestamp=1_600_000_000 + i) for i in range(9)])
    write_meta(tmp_path / "m.jsonl", [f"P{i}" for i in range(7)])
    with pytest.raises(InputError, match=r"r\.jsonl.*seconds"):
        ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "extension", "gz_cut", "parquet_cut",
                                  "meta_mismatch", "meta_no_parent_asin"])
def test_whole_input_errors_name_the_file(tmp_path, case):
    reviews = tmp_path / "r.jsonl"
    meta = tmp_path / "m.jsonl"
    write_lines(reviews, [review(i) for i in range(200)])
    write_meta(meta, [f"P{i}" for i in range(7)])
    bad = reviews
    if case == "missing":
        bad = reviews = tmp_path / "nope.jsonl"
    elif case == "empty":
        reviews.write_bytes(b"")
    elif case == "extension":
        bad = reviews = tmp_path / "r.csv"
        reviews.write_text("a,b\n")
    elif case == "gz_cut":
        bad = reviews = tmp_path / "r.jsonl.gz"
        data = gzip.compress(("\n".join(json.dumps(review(i)) for i in range(5000))).encode())
        reviews.write_bytes(data[: len(data) // 2])
    elif case == "parquet_cut":
        bad = reviews = tmp_path / "r.parquet"
        pq.write_table(pa.Table.from_pylist([review(i) for i in range(200)]), reviews)
        reviews.write_bytes(reviews.read_bytes()[:-100])
    elif case == "meta_mismatch":
        bad = meta
        write_meta(meta, ["X1", "X2", "P1"])
    elif case == "meta_no_parent_asin":
        bad = meta
        write_lines(meta, [{"asin": "P1", "title": "t"}])
    with pytest.raises(InputError) as err:
        ingest([reviews], meta, tmp_path / "out", cfg())
    assert str(bad) in str(err.value)
    if case in ("gz_cut", "parquet_cut"):
        assert "truncated" in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not [p for p in (tmp_path / "out").glob("*") if p.name.startswith(".tmp-")] \
        if (tmp_path / "out").exists() else True


def test_parquet_bad_rows_use_row_index(tmp_path):
    rows = [review(i) for i in range(20)]
    rows[3]["rating"] = 0.0
    rows[5]["timestamp"] = 1_600_000_000
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    write_meta(tmp_path / "m.jsonl", [f"P{i}" for i in range(7)])
    m = ingest([tmp_path / "r.parquet"], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    got = {q["line"]: q["reason"] for q in quarantine(tmp_path / "out")}
    assert got == {3: "rating out of range [1, 5]", 5: REASON_SECONDS}
    assert m["rows_out"] == 18


def test_changed_input_reruns(tmp_path):
    write_lines(tmp_path / "r.jsonl", [review(i) for i in range(30)])
    write_meta(tmp_path / "m.jsonl", [f"P{i}" for i in range(7)])
    ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    write_lines(tmp_path / "r.jsonl", [review(i) for i in range(40)])
    m = ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    assert "skipped" not in m and m["rows_out"] == 40


def test_a_changed_input_is_named_in_the_log(tmp_path, caplog):
    reviews = tmp_path / "r.jsonl"
    write_lines(reviews, [review(i) for i in range(30)])
    write_meta(tmp_path / "m.jsonl", [f"P{i}" for i in range(7)])
    ingest([reviews], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    before = reviews.stat().st_size
    write_lines(reviews, [review(i) for i in range(40)])
    with caplog.at_level(logging.INFO, logger="hpcpipe"):
        m = ingest([reviews], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    assert "skipped" not in m and m["rows_out"] == 40
    assert (f"input {reviews.resolve()} changed: size {before} -> {reviews.stat().st_size}"
            in caplog.text), caplog.text


def test_a_file_replaced_with_the_same_size_and_time_is_still_a_change(tmp_path, caplog):
    """What `cp -p` or `rsync -a` of a regenerated file can leave: only the content differs."""
    reviews = tmp_path / "r.jsonl"
    write_lines(reviews, [review(i) for i in range(30)])
    write_meta(tmp_path / "m.jsonl", [f"P{i}" for i in range(7)])
    ingest([reviews], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    st = reviews.stat()
    write_lines(reviews, [review(i, rating=3.0) for i in range(30)])
    os.utime(reviews, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (reviews.stat().st_size, reviews.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with caplog.at_level(logging.INFO, logger="hpcpipe"):
        m = ingest([reviews], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    assert "skipped" not in m
    assert f"input {reviews.resolve()} changed: content" in caplog.text, caplog.text
    ratings = pq.read_table(tmp_path / "out" / "reviews").column("rating").to_pylist()
    assert set(ratings) == {3.0}


def test_a_changed_setting_is_named_in_the_log(tmp_path, caplog):
    write_lines(tmp_path / "r.jsonl", [review(i) for i in range(30)])
    write_meta(tmp_path / "m.jsonl", [f"P{i}" for i in range(7)])
    ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    with caplog.at_level(logging.INFO, logger="hpcpipe"):
        m = ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", tmp_path / "out", cfg(10))
    assert "skipped" not in m and m["n_buckets"] == 3
    assert "target_bucket_rows changed: 500000 -> 10" in caplog.text, caplog.text


def test_a_manifest_without_fingerprint_is_recomputed_once(tmp_path, caplog):
    """A manifest an older hpcpipe wrote: what it was computed from is unknown."""
    write_lines(tmp_path / "r.jsonl", [review(i) for i in range(30)])
    write_meta(tmp_path / "m.jsonl", [f"P{i}" for i in range(7)])
    args = ([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    first = ingest(*args)
    path = tmp_path / "out" / "manifest.json"
    old = json.loads(path.read_text())
    made_from = old.pop("made_from")
    del old["fingerprint"]
    old["inputs"] = [{k: v for k, v in i.items() if k != "sample"} for i in made_from["inputs"]]
    old["settings"] = {"target_bucket_rows": 500_000}
    path.write_text(json.dumps(old))
    with caplog.at_level(logging.INFO, logger="hpcpipe"):
        again = ingest(*args)
        assert "skipped" not in again and "recomputing once" in caplog.text, caplog.text
        assert again["fingerprint"] == first["fingerprint"]
        caplog.clear()
        assert ingest(*args)["skipped"] is True
    assert "ingest already done for these inputs" in caplog.text


def test_bucket_of_is_stable_across_processes():
    ids = [f"B0{i:08d}" for i in range(1000)]
    here = bucket_of(ids, 64)
    assert here.dtype == np.int32 and here.min() >= 0 and here.max() < 64
    assert len(set(here.tolist())) > 50  # spreads
    assert (bucket_of(pa.array(ids), 64) == here).all()
    assert (bucket_of(pc.cast(pa.chunked_array([ids[:10], ids[10:]]), pa.string()), 64)
            == here).all()
    code = ("from hpcpipe.steps.ingest import bucket_of; "
            "print(bucket_of([f'B0{i:08d}' for i in range(1000)], 64).tolist())")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONHASHSEED": seed})
        assert json.loads(out.stdout) == here.tolist()
    # Fixed reference values: a change of hash function would silently move products.
    assert bucket_of(["B00000001", "B0BTRZ416V", "X"], 1000).tolist() == _REFERENCE


_REFERENCE = [775, 362, 87]


def test_no_valid_rows_is_an_input_error_and_keeps_the_quarantine(tmp_path):
    write_lines(tmp_path / "r.jsonl", [review(i, rating=9.0) for i in range(5)])
    write_meta(tmp_path / "m.jsonl", [f"P{i}" for i in range(7)])
    with pytest.raises(InputError, match=r"no valid reviews.*5 rating out of range"):
        ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    assert len(quarantine(tmp_path / "out")) == 5
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_sort_and_dedupe_orders_and_keeps_like_a_plain_sort(tmp_path):
    """Against pandas on many ties (same product and millisecond) and duplicates, in input order
    and not."""
    import pandas as pd

    from hpcpipe.steps.ingest.validation import sort_and_dedupe

    rng = np.random.default_rng(3)
    for shuffled, step in ((False, 7_000_000_000), (True, 1), (False, 1 << 57)):
        n = 5_000
        df = pd.DataFrame({
            "parent_asin": rng.choice([f"P{i}" for i in range(40)] + ["", "Pä", "P10"], n),
            "timestamp": TS + rng.integers(0, 30, n) * step,  # the last: too long to pack
            "user_id": rng.choice([f"U{i}" for i in range(25)], n),
            "value": np.arange(n),
            "_row": np.arange(n) * 3,
        })
        if shuffled:
            df = df.sample(frac=1, random_state=1)
        got, dups = sort_and_dedupe(pa.Table.from_pandas(df, preserve_index=False))
        want = df.sort_values(["parent_asin", "timestamp", "user_id", "_row"]).drop_duplicates(
            ["parent_asin", "timestamp", "user_id"], keep="first")
        assert dups == n - len(want) > 0
        assert got.to_pandas().reset_index(drop=True).equals(want.reset_index(drop=True))


def test_metadata_of_other_products_is_refused_before_the_reviews_are_read(tmp_path,
                                                                           monkeypatch):
    import hpcpipe.steps.ingest as ingest_module

    write_lines(tmp_path / "r.jsonl", [review(i, parent_asin=f"P{i % 80}") for i in range(400)])
    write_meta(tmp_path / "m.jsonl", [f"Q{i}" for i in range(80)])
    parts_read = []
    real = ingest_module.read_part
    monkeypatch.setattr(ingest_module, "read_part",
                        lambda *a: parts_read.append(a) or real(*a))
    with pytest.raises(InputError, match=r"does not match reviews .*r\.jsonl: only 0 of 80"):
        ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    assert parts_read == []
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("case,expect", [
    ("no_field", "has no parent_asin field"), ("empty", "has no products"),
    ("parquet_no_column", "has no parent_asin column")])
def test_unusable_metadata_is_refused_naming_the_file(tmp_path, case, expect):
    write_lines(tmp_path / "r.jsonl", [review(i) for i in range(30)])
    if case == "no_field":
        meta = tmp_path / "m.jsonl"
        write_lines(meta, [{"asin": f"P{i}", "title": "t"} for i in range(7)])
    elif case == "empty":
        meta = tmp_path / "m.jsonl"
        meta.write_text("\n")
    else:
        meta = tmp_path / "m.parquet"
        pq.write_table(pa.table({"asin": ["P1"], "title": ["t"]}), meta)
    with pytest.raises(InputError, match=expect) as err:
        ingest([tmp_path / "r.jsonl"], meta, tmp_path / "out", cfg())
    assert str(meta) in str(err.value)


def test_metadata_keeps_the_first_record_of_a_product_from_parquet_too(tmp_path):
    write_lines(tmp_path / "r.jsonl", [review(i) for i in range(30)])
    records = [{"parent_asin": f"P{i % 7}", "title": f"first {i}" if i < 7 else f"later {i}",
                "main_category": "Toys", "store": None} for i in range(20)]
    write_lines(tmp_path / "m.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "m.parquet")
    for meta in ("m.jsonl", "m.parquet"):
        ingest([tmp_path / "r.jsonl"], tmp_path / meta, tmp_path / f"out-{meta}",
               cfg())
        products = pq.read_table(tmp_path / f"out-{meta}" / "products.parquet").to_pylist()
        assert [p["title"] for p in products] == [f"first {i}" for i in range(7)]


@pytest.mark.parametrize("slice_rows", [1, 3, 1 << 16])
def test_metadata_coverage_counts_the_same_in_slices_as_at_once(tmp_path, monkeypatch,
                                                                 slice_rows):
    """The metadata's products are looked up a slice at a time (memory of the products asked
    about, not of all 48M listed): every count equals the whole-column answer, whatever the
    slice size, with products listed twice, absent, or at a slice's edge."""
    from hpcpipe.steps.ingest import validation

    monkeypatch.setattr(validation, "_COVERAGE_MIN_SLICE", slice_rows)
    listed = [f"P{i}" for i in range(0, 300, 2)] + ["P10", "P298", "P0"]
    meta = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"parent_asin": listed}), meta, row_group_size=7)
    rng = np.random.default_rng(5)
    for asked in ([], ["P1"], ["P298"], [f"P{i}" for i in rng.permutation(320)[:90]],
                  [f"P{i}" for i in range(320)]):
        products = pa.array(asked, pa.string())
        want = pc.sum(pc.is_in(products, value_set=pa.array(listed))).as_py() or 0
        assert validation.metadata_covers(products, meta) == want
    assert validation.metadata_covers(pa.array([f"P{i}" for i in range(320)]), meta) == 150


def test_products_are_each_reviewed_products_first_metadata_row_in_name_order(tmp_path):
    """products.parquet, found by sorting parent_asin alone, equals the plain definition: for every
    reviewed product in name order, its first metadata row, or nulls without one."""
    rng = np.random.default_rng(7)
    names = [f"P{rng.integers(0, 10**6):06d}" for _ in range(400)]
    meta = pa.table({"parent_asin": [names[i] for i in rng.integers(0, 300, 900)],
                     "title": [f"t{i}" for i in range(900)],
                     "main_category": [None if i % 5 == 0 else f"c{i}" for i in range(900)],
                     "store": [f"s{i}" for i in range(900)]}, schema=META_SCHEMA)
    pq.write_table(meta, tmp_path / "meta.parquet", row_group_size=64)
    # Reviewed: most of the first 300 names (with metadata), and 100 with none.
    reviewed = sorted(set(names[:250] + names[300:]) - set(names[::9]))
    products = pa.array(rng.permutation(np.array(reviewed, dtype=object)), pa.string())
    missing = _write_products(tmp_path / "products.parquet", tmp_path / "meta.parquet", products)

    first: dict[str, dict] = {}
    for row in meta.to_pylist():
        first.setdefault(row["parent_asin"], row)
    expected = [first.get(p, {"parent_asin": p, "title": None, "main_category": None,
                              "store": None}) for p in reviewed]
    assert pq.read_table(tmp_path / "products.parquet").to_pylist() == expected
    assert missing == sum(p not in first for p in reviewed) > 0
