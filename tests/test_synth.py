"""hpcpipe.steps.synth: layout, determinism, structure."""

from __future__ import annotations

import gzip
import json

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
