"""hpcpipe.steps.synth: layout, determinism, structure."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from hpcpipe.steps.synth import CATEGORIES, write_synthetic

REVIEW_FIELDS = {"rating", "title", "text", "images", "asin", "parent_asin", "user_id",
                 "timestamp", "helpful_vote", "verified_purchase"}


def _read_jsonl_gz(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_jsonl_gz_layout_and_counts(tmp_path):
    info = write_synthetic(tmp_path, 5_000, seed=1)
    assert info["n_reviews"] == 5_000 and info["n_products"] == 5_000 // 80
    rows = _read_jsonl_gz(tmp_path / "reviews.jsonl.gz")
    assert len(rows) == 5_000
    assert set(rows[0]) == REVIEW_FIELDS
    df = pd.DataFrame(rows)
    assert df.rating.between(1, 5).all() and isinstance(rows[0]["rating"], float)
    assert df.timestamp.between(1514764800000, 1704067200000).all()
    assert 0 < df.text.isna().mean() < 0.1
    assert df.parent_asin.str.len().eq(10).all() and df.user_id.str.len().eq(28).all()
    meta = _read_jsonl_gz(tmp_path / "meta.jsonl.gz")
    assert len(meta) == info["n_products"]
    assert {"parent_asin", "title", "main_category", "categories", "store"} <= set(meta[0])
    assert set(df.parent_asin) <= {m["parent_asin"] for m in meta}
    names = tuple(c[0] for c in CATEGORIES)
    assert all(m["title"].startswith(names) for m in meta)
    assert not list(tmp_path.glob(".tmp-*"))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_synthetic(tmp_path / "a", 3_000, seed=7)
    b = write_synthetic(tmp_path / "b", 3_000, seed=7)
    c = write_synthetic(tmp_path / "c", 3_000, seed=8)
    read = lambda info: open(info["reviews"], "rb").read()  # noqa: E731
    assert read(a) == read(b)
    assert read(a) != read(c)


def test_parquet_matches_jsonl(tmp_path):
    write_synthetic(tmp_path / "p", 2_500, seed=3, fmt="parquet", n_products=40)
    write_synthetic(tmp_path / "j", 2_500, seed=3, fmt="jsonl", n_products=40)
    p = pq.read_table(tmp_path / "p" / "reviews.parquet").to_pandas()
    j = pd.read_json(tmp_path / "j" / "reviews.jsonl", lines=True, dtype=False)
    assert len(p) == len(j) == 2_500
    for col in ("parent_asin", "user_id", "timestamp", "rating", "helpful_vote"):
        assert p[col].tolist() == j[col].tolist(), col
    assert pq.read_table(tmp_path / "p" / "meta.parquet").num_rows == 40


def test_seasonality_is_learnable(tmp_path):
    write_synthetic(tmp_path, 40_000, seed=0, fmt="parquet")
    r = pq.read_table(tmp_path / "reviews.parquet", columns=["parent_asin", "timestamp"])
    m = pq.read_table(tmp_path / "meta.parquet", columns=["parent_asin", "title"]).to_pandas()
    df = r.to_pandas().merge(m, on="parent_asin")
    month = pd.to_datetime(df.timestamp, unit="ms").dt.month
    xmas = df.title.str.startswith("Christmas Lights")
    assert ((month[xmas] >= 11).mean()) > 0.4  # vs 2/12 without seasonality


def test_unknown_format_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        write_synthetic(tmp_path, 10, fmt="csv")


def test_realistic_sizes_match_the_published_means_with_a_long_tail(tmp_path):
    """Amazon Reviews'23: 30.14B review tokens over 571.54M reviews, ~53 per review."""
    info = write_synthetic(tmp_path, 40_000, seed=2, sizes="realistic")
    rows = _read_jsonl_gz(info["reviews"])
    words = np.array([len(r["text"].split()) for r in rows if r["text"] is not None])
    assert 50 <= words.mean() <= 56, words.mean()
    assert np.percentile(words, 99) > 4 * words.mean() and words.max() > 500  # the long tail
    assert 3 <= np.mean([len(r["title"].split()) for r in rows]) <= 5
    with_images = [r["images"] for r in rows if r["images"]]
    assert 0.06 <= len(with_images) / len(rows) <= 0.10
    assert set(with_images[0][0]) == {"small_image_url", "medium_image_url", "large_image_url",
                                      "attachment_type"}
    meta = _read_jsonl_gz(info["metadata"])
    assert {"features", "description", "images", "details", "price"} <= set(meta[0])
    assert 3_000 <= np.mean([len(json.dumps(m)) for m in meta]) <= 20_000


def test_sizes_and_files_change_no_review_the_generator_draws(tmp_path):
    """The forecast floor (train/evaluate.py) relies on the products, times and ratings drawn
    for a seed: realistic sizes and several files must not move them."""
    compact = write_synthetic(tmp_path / "c", 6_000, seed=4, fmt="parquet")
    real = write_synthetic(tmp_path / "r", 6_000, seed=4, fmt="parquet", sizes="realistic",
                           files=3)
    keys = ["parent_asin", "user_id", "timestamp", "rating", "helpful_vote"]
    one = pq.read_table(compact["reviews"], columns=keys).to_pandas()
    parts = [pq.read_table(f, columns=keys).to_pandas() for f in real["reviews_files"]]
    assert len(real["reviews_files"]) == 3 and all(len(p) for p in parts)
    both = pd.concat(parts).sort_values(keys).reset_index(drop=True)
    assert both.equals(one.sort_values(keys).reset_index(drop=True))
    # Each file holds whole categories: no product in two files.
    sets = [set(p.parent_asin) for p in parts]
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2]) and not (sets[0] & sets[2])


def test_realistic_files_are_deterministic_and_split_by_category(tmp_path):
    a = write_synthetic(tmp_path / "a", 3_000, seed=5, files=2, sizes="realistic")
    b = write_synthetic(tmp_path / "b", 3_000, seed=5, files=2, sizes="realistic")
    for fa, fb in zip(a["reviews_files"] + [a["metadata"]], b["reviews_files"] + [b["metadata"]],
                      strict=True):
        assert open(fa, "rb").read() == open(fb, "rb").read()
    assert [p.rsplit("/", 1)[1] for p in a["reviews_files"]] == [
        "reviews-00-of-02.jsonl.gz", "reviews-01-of-02.jsonl.gz"]
    assert sum(len(_read_jsonl_gz(f)) for f in a["reviews_files"]) == 3_000
    with pytest.raises(ValueError, match="one per category"):
        write_synthetic(tmp_path / "x", 10, files=17)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_realistic_metadata_is_written_in_slices_with_the_same_records(tmp_path, monkeypatch,
                                                                       fmt):
    """At 31.8M reviews the metadata strings pass Arrow's 2 GB per array: slices of products."""
    import hpcpipe.steps.synth as synth

    whole = write_synthetic(tmp_path / "w", 4_000, seed=6, fmt=fmt, sizes="realistic")
    monkeypatch.setattr(synth, "_META_SLICE", 7)
    sliced = write_synthetic(tmp_path / "s", 4_000, seed=6, fmt=fmt, sizes="realistic")
    if fmt == "jsonl":
        assert open(whole["metadata"], "rb").read() == open(sliced["metadata"], "rb").read()
        assert len(open(sliced["metadata"], "rb").read().splitlines()) == 50
    else:
        assert pq.read_table(whole["metadata"]).equals(pq.read_table(sliced["metadata"]))
        assert pq.read_table(sliced["metadata"]).num_rows == 50
