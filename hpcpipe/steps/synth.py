"""Synthetic product reviews in the Amazon Reviews'23 layout, with structure a model can learn.

``write_synthetic`` writes ``reviews.<fmt>`` and ``meta.<fmt>`` (fmt ``jsonl.gz``, ``jsonl`` or
``parquet``). What is in the data:

- ~16 product categories; the category's name opens every product title ("Christmas Lights ...",
  "Garden Hose ...") and each category has its own seasonality by month (Christmas lights peak in
  December, garden hoses in spring, swimwear in summer, ...).
- Per product: a launch date, a rise-and-decay life cycle (gamma-shaped in time since launch), a
  Zipf-like popularity and a hidden quality that drives its ratings.
- Reviews from 2018-01-01 to 2023-12-31, helpful votes (heavy tailed), verified purchases, review
  texts of varying length whose words follow the rating, and about 3% null texts.

``sizes="realistic"`` (what ``hpcpipe data synth`` writes) gives texts, titles, image lists and
metadata records of the published sizes (see :mod:`hpcpipe.steps.synth_sizes`); ``"compact"``
(the pipeline's own sample) keeps ~10-word texts and no images. ``files=N`` splits the reviews into
N files by category, like the per-category files of Amazon Reviews'23; the rows are the same as
in one file. Neither changes which product, time or rating a review gets.

The output depends only on ``seed`` (and the sizes): rows are made in chunks of ~1M with a random
generator per chunk, so memory stays bounded at any size. JSON lines are built column-wise with
Arrow string kernels (no per-row ``json.dumps``); gzip is written at level 1 in a background thread.
Files are written under temporary names and renamed when complete.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from hpcpipe.files import atomic_path
from hpcpipe.steps import synth_sizes
from hpcpipe.steps.synth_sizes import ReviewPools

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("jsonl.gz", "jsonl", "parquet")
SIZES: tuple[str, ...] = ("compact", "realistic")
CHUNK_ROWS = 1_000_000
REVIEWS_PER_PRODUCT = 80

START_MS = 1514764800000  # 2018-01-01T00:00:00Z
END_MS = 1704067200000  # 2024-01-01T00:00:00Z (exclusive)
DAY_MS = 86_400_000

# name (opens every product title), main_category, sub-category, monthly weights Jan..Dec.
CATEGORIES: list[tuple[str, str, str, tuple[float, ...]]] = [
    ("Wireless Headphones", "All Electronics", "Headphones",
     (0.8, 0.6, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.8, 1.0, 1.0)),
    ("Phone Charger", "Cell Phones & Accessories", "Chargers",
     (0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 1.0, 0.9, 0.9, 0.9)),
    ("Christmas Lights", "Home & Kitchen", "Seasonal Decor",
     (0.08, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.05, 0.15, 0.7, 1.0)),
    ("Garden Hose", "Patio, Lawn & Garden", "Watering Equipment",
     (0.1, 0.15, 0.45, 0.85, 1.0, 0.9, 0.7, 0.5, 0.3, 0.15, 0.1, 0.08)),
    ("Swimwear", "Clothing, Shoes & Jewelry", "Swimsuits",
     (0.1, 0.15, 0.3, 0.5, 0.8, 1.0, 1.0, 0.7, 0.3, 0.1, 0.08, 0.1)),
    ("Space Heater", "Home & Kitchen", "Heating",
     (1.0, 0.8, 0.4, 0.15, 0.05, 0.03, 0.03, 0.05, 0.2, 0.5, 0.9, 1.0)),
    ("Halloween Costume", "Clothing, Shoes & Jewelry", "Costumes",
     (0.03, 0.03, 0.03, 0.03, 0.03, 0.03, 0.03, 0.05, 0.3, 1.0, 0.1, 0.03)),
    ("School Backpack", "Office Products", "Backpacks",
     (0.4, 0.3, 0.3, 0.3, 0.3, 0.4, 0.8, 1.0, 0.7, 0.3, 0.3, 0.4)),
    ("Sunscreen Lotion", "Beauty & Personal Care", "Sun Care",
     (0.15, 0.15, 0.3, 0.5, 0.8, 1.0, 1.0, 0.8, 0.4, 0.2, 0.15, 0.15)),
    ("Yoga Mat", "Sports & Outdoors", "Yoga",
     (1.0, 0.8, 0.6, 0.5, 0.5, 0.4, 0.4, 0.4, 0.5, 0.5, 0.5, 0.6)),
    ("Coffee Maker", "Home & Kitchen", "Coffee Machines",
     (0.7, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.7, 0.9, 1.0)),
    ("Board Game", "Toys & Games", "Games",
     (0.5, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.4, 0.7, 1.0)),
    ("Dog Toy", "Pet Supplies", "Dog Toys",
     (0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.9, 1.0)),
    ("Camping Tent", "Sports & Outdoors", "Tents",
     (0.1, 0.1, 0.25, 0.5, 0.85, 1.0, 0.95, 0.7, 0.35, 0.15, 0.1, 0.1)),
    ("Snow Boots", "Clothing, Shoes & Jewelry", "Boots",
     (1.0, 0.7, 0.3, 0.1, 0.05, 0.03, 0.03, 0.05, 0.15, 0.5, 0.9, 1.0)),
    ("Kitchen Knife Set", "Home & Kitchen", "Cutlery",
     (0.6, 0.5, 0.5, 0.5, 0.6, 0.5, 0.5, 0.5, 0.5, 0.6, 0.8, 1.0)),
]

_ADJECTIVES = ["Pro", "Ultra", "Classic", "Compact", "Deluxe", "Premium", "Essential", "Max",
               "Lite", "Plus", "Eco", "Smart", "Heavy Duty", "Portable", "Value Pack", "Elite"]
_COLORS = ["Black", "White", "Blue", "Red", "Green", "Grey", "Silver", "Pink", "Navy", "Beige"]
_SYLLABLES = ["ka", "zen", "tor", "vi", "lo", "mar", "qu", "rex", "no", "sa", "bel", "tri", "on",
              "del", "fi", "ga", "lux", "mi", "pra", "sol"]
_WORDS = {
    1: ["broke after two days", "complete waste of money", "does not work at all",
        "returned it immediately", "terrible quality", "arrived damaged", "very disappointed",
        "stopped working", "cheap plastic", "would not recommend"],
    2: ["not great", "below expectations", "feels flimsy", "works sometimes",
        "instructions were confusing", "smaller than pictured", "only okay for the price",
        "had some issues", "meh overall", "not what I hoped"],
    3: ["it is okay", "does the job", "average quality", "fine for now", "nothing special",
        "works as expected mostly", "decent for the price", "some pros and cons",
        "good enough", "could be better"],
    4: ["pretty good", "works well", "nice quality", "happy with it", "good value",
        "would buy again", "easy to use", "solid product", "arrived quickly", "mostly great"],
    5: ["absolutely love it", "excellent quality", "works perfectly", "best purchase this year",
        "highly recommend", "exceeded expectations", "great value", "five stars",
        "my family loves it", "perfect gift"],
}
_FILLER = ["I bought this for my kitchen", "we used it every day for a month",
           "the packaging was fine", "shipping took a few days", "my kids tried it too",
           "compared to the last one I had", "the color matches the photos",
           "setup took about ten minutes", "I was skeptical at first", "after a few weeks of use"]
_REVIEW_TITLES = {
    1: ["Terrible", "Do not buy", "Broken", "Waste of money", "One star"],
    2: ["Disappointing", "Not great", "Meh", "Could be better", "Flimsy"],
    3: ["Okay", "Average", "It's fine", "Decent", "Three stars"],
    4: ["Good", "Nice product", "Works well", "Pretty good", "Happy"],
    5: ["Love it!", "Excellent", "Perfect", "Five stars", "Great buy"],
}
_TEXTS_PER_RATING = 1024
_SEASON_TRIES = 12  # draws of a review's time before the uniform fallback
_ALPHABET36 = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
_ALPHABET32 = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", dtype=np.uint8)


def write_synthetic(out_dir: Path, n_reviews: int, seed: int = 0, n_products: int | None = None,
                    fmt: str = "jsonl.gz", files: int = 1, sizes: str = "compact"
                    ) -> dict[str, Any]:
    """Write the reviews and ``out_dir/meta.<fmt>``; return counts and paths.

    One file (``files=1``) is ``out_dir/reviews.<fmt>``; several are
    ``out_dir/reviews-KK-of-NN.<fmt>``, file k holding the reviews of the categories c with
    ``c % files == k`` (at most one file per category). ``sizes`` is "compact" or "realistic"
    (module doc). ``n_products`` defaults to ``n_reviews // 80`` (at least 1). The same ``seed``
    and sizes give the same rows (and byte-identical jsonl/jsonl.gz files). Returns
    ``{"reviews": path (one file) , "reviews_files": [paths], "metadata": path, "n_reviews",
    "n_products", "n_users", "seed", "format", "sizes", "seconds"}``. Raises ValueError for an
    unknown ``fmt`` or ``sizes``, a non-positive size or a file count above the categories'.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if sizes not in SIZES:
        raise ValueError(f"unknown sizes {sizes!r}; use one of {', '.join(SIZES)}")
    if n_reviews <= 0:
        raise ValueError(f"n_reviews must be positive, got {n_reviews}")
    if not 1 <= files <= len(CATEGORIES):
        raise ValueError(f"files must be between 1 and {len(CATEGORIES)} (one per category at "
                         f"most), got {files}")
    if n_products is None:
        n_products = max(1, n_reviews // REVIEWS_PER_PRODUCT)
    if n_products <= 0:
        raise ValueError(f"n_products must be positive, got {n_products}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    products = _make_products(n_products, n_reviews, seed)
    n_users = max(1, n_reviews // 3)
    texts = _make_texts(seed)
    pools = (synth_sizes.review_pools(seed, _WORDS, _REVIEW_TITLES)
             if sizes == "realistic" else None)

    paths = ([out_dir / f"reviews.{fmt}"] if files == 1 else
             [out_dir / f"reviews-{k:02d}-of-{files:02d}.{fmt}" for k in range(files)])
    meta_path = out_dir / f"meta.{fmt}"
    chunks = (_review_chunk(products, texts, n_users, seed, i, min(CHUNK_ROWS, n_reviews - lo))
              for i, lo in enumerate(range(0, n_reviews, CHUNK_ROWS)))
    _write_reviews(paths, fmt, chunks, products, texts, pools)
    meta = _meta_table(products)
    with atomic_path(meta_path) as tmp:
        if sizes == "realistic":
            _write_realistic_meta(tmp, fmt, meta, products, seed)
        elif fmt == "parquet":
            pq.write_table(meta, tmp, compression="zstd")
        else:
            lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in meta.to_pylist())
            _write_jsonl(tmp, iter([lines.encode("utf-8")]), fmt == "jsonl.gz")
    seconds = time.perf_counter() - start
    log.info("synthesized %d reviews of %d products into %s in %.1f s (%.0f rows/s)", n_reviews,
             n_products, out_dir, seconds, n_reviews / max(seconds, 1e-9))
    out: dict[str, Any] = {"reviews_files": [str(p) for p in paths], "metadata": str(meta_path),
                           "n_reviews": n_reviews, "n_products": n_products, "n_users": n_users,
                           "seed": seed, "format": fmt, "sizes": sizes,
                           "seconds": round(seconds, 3)}
    if files == 1:
        out["reviews"] = str(paths[0])
    return out


def generator_parameters(n_reviews: int, seed: int = 0,
                         n_products: int | None = None) -> dict[str, Any]:
    """What the generator draws reviews from, for the same arguments as ``write_synthetic``
    (deterministic from ``seed``): per product its ``parent_asin`` (list of str), category
    index ``cat``, popularity ``weight`` (sums to 1), ``launch`` (ms) and life-cycle
    ``scale_days``; the monthly ``season`` weights (n_categories, 12); the time range
    ``start_ms``/``end_ms``; the ``tries`` of the seasonal rejection and ``n_reviews``.

    A review picks a product by ``weight``, then a time launch + Gamma(2, scale_days) days kept
    with probability season[cat, month] (up to ``tries`` draws; else uniform between the launch,
    clipped to the range, and ``end_ms``). The train step uses this to compute the best possible
    forecast of synthetic data (``hpcpipe.steps.train.evaluate``).
    """
    if n_products is None:
        n_products = max(1, n_reviews // REVIEWS_PER_PRODUCT)
    products = _make_products(n_products, n_reviews, seed)
    return {"parent_asin": products["parent_asin"].to_pylist(), "cat": products["cat"],
            "weight": products["weight"], "launch": products["launch"],
            "scale_days": products["scale_days"],
            "season": np.array([c[3] for c in CATEGORIES], dtype=np.float64),
            "start_ms": START_MS, "end_ms": END_MS, "tries": _SEASON_TRIES,
            "n_reviews": n_reviews}


# ---------------------------------------------------------------------------------------------
# Products, users and texts.


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed uint64 per input (wrap-around arithmetic is intended)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _fixed_width_strings(chars: np.ndarray) -> pa.Array:
    """An Arrow string array from an (n, width) uint8 array of ASCII characters, without copies."""
    n, width = chars.shape
    offsets = (np.arange(n + 1, dtype=np.int64) * width).astype(np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets),
                                       pa.py_buffer(np.ascontiguousarray(chars)))


def _asin_strings(ids: np.ndarray, salt: int, prefix: bytes = b"B0") -> pa.Array:
    """10-character ASINs: prefix + 8 base-36 characters, distinct for distinct ``ids``."""
    # Multiplying by a constant coprime to 36 is a bijection modulo 36**8.
    x = (ids.astype(np.int64) * 2_654_435_761 + salt) % (36**8)
    chars = np.empty((len(ids), 10), dtype=np.uint8)
    chars[:, 0] = prefix[0]
    chars[:, 1] = prefix[1]
    for pos in range(9, 1, -1):
        chars[:, pos] = _ALPHABET36[x % 36]
        x //= 36
    return _fixed_width_strings(chars)


def _user_strings(users: np.ndarray, seed: int) -> pa.Array:
    """28-character user ids like Amazon's ("A" + 27 base-32 characters)."""
    base = users.astype(np.uint64) * np.uint64(4) + np.uint64(seed & 0xFFFF) * np.uint64(1 << 40)
    chars = np.empty((len(users), 28), dtype=np.uint8)
    chars[:, 0] = ord("A")
    for word in range(3):
        h = _splitmix64(base + np.uint64(word))
        for k in range(9):
            chars[:, 1 + word * 9 + k] = _ALPHABET32[(h >> np.uint64(5 * k)) & np.uint64(31)]
    return _fixed_width_strings(chars)


def _make_products(n_products: int, n_reviews: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 0])
    n_cat = len(CATEGORIES)
    cat = rng.integers(0, n_cat, n_products)
    # Zipf-like popularity over a random ranking; the offset keeps the top product near 0.1%.
    rank = rng.permutation(n_products)
    weight = 1.0 / (rank + 100.0)
    cdf = np.cumsum(weight)
    cdf /= cdf[-1]
    quality = rng.beta(5.0, 2.0, n_products)
    launch_lo, launch_hi = START_MS - 540 * DAY_MS, END_MS - 60 * DAY_MS
    launch = rng.integers(launch_lo, launch_hi, n_products)
    # Life cycle: time since launch ~ Gamma(2, scale); half the scales are short (fads), the rest
    # long (evergreen products).
    scale_days = np.exp(rng.normal(np.log(200.0), 0.8, n_products))
    salt = int(rng.integers(0, 36**8))
    parent_asin = _asin_strings(np.arange(n_products), salt)

    brands = ["".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()
              for _ in range(max(8, min(5000, n_products // 40)))]
    brand = rng.integers(0, len(brands), n_products)
    adj = rng.integers(0, len(_ADJECTIVES), n_products)
    color = rng.integers(0, len(_COLORS), n_products)
    model = rng.integers(100, 9999, n_products)
    cat_names = np.array([c[0] for c in CATEGORIES], dtype=object)
    titles = pc.binary_join_element_wise(
        pa.array(cat_names[cat], pa.string()), " ",
        pa.array(np.array(_ADJECTIVES, dtype=object)[adj], pa.string()), " by ",
        pa.array(np.array(brands, dtype=object)[brand], pa.string()), ", ",
        pa.array(np.array(_COLORS, dtype=object)[color], pa.string()), ", Model ",
        pa.array(model).cast(pa.string()), "")
    return {"n": n_products, "cat": cat, "cdf": cdf, "weight": weight / weight.sum(),
            "quality": quality, "launch": launch, "scale_days": scale_days,
            "parent_asin": parent_asin, "title": titles, "brand": brand, "brands": brands,
            "n_reviews": n_reviews, "salt": salt}


def _make_texts(seed: int) -> dict[int, dict[str, pa.Array]]:
    """Per rating: a pool of review texts (varying length) and titles, plain and JSON-quoted."""
    rng = np.random.default_rng([seed, 1])
    out: dict[int, dict[str, pa.Array]] = {}
    for r in range(1, 6):
        texts = []
        for _ in range(_TEXTS_PER_RATING):
            n_sent = int(min(40, rng.lognormal(1.0, 0.8))) + 1
            parts = []
            for _ in range(n_sent):
                if rng.random() < 0.35:
                    parts.append(str(rng.choice(_FILLER)))
                else:
                    parts.append(str(rng.choice(_WORDS[r])))
            text = ". ".join(parts).capitalize() + "."
            texts.append(text)
        titles = _REVIEW_TITLES[r]
        out[r] = {"text": pa.array(texts, pa.string()), "title": pa.array(titles, pa.string()),
                  "text_json": pa.array([json.dumps(t) for t in texts], pa.string()),
                  "title_json": pa.array([json.dumps(t) for t in titles], pa.string())}
    return out


# ---------------------------------------------------------------------------------------------
# Reviews, one chunk at a time.


def _month_of(ms: np.ndarray) -> np.ndarray:
    return (ms // DAY_MS).astype("datetime64[D]").astype("datetime64[M]").astype(np.int64) % 12


def _review_chunk(products: dict[str, Any], texts: dict[int, dict[str, pa.Array]], n_users: int,
                  seed: int, index: int, n: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 2, index])
    prod = np.searchsorted(products["cdf"], rng.random(n), side="right")
    prod = np.minimum(prod, products["n"] - 1)
    season = np.array([c[3] for c in CATEGORIES])  # (n_cat, 12), max 1 per row
    ts = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    for _ in range(_SEASON_TRIES):
        p = prod[todo]
        offset = rng.gamma(2.0, products["scale_days"][p]) * DAY_MS
        cand = products["launch"][p] + offset.astype(np.int64)
        ok = (cand >= START_MS) & (cand < END_MS)
        month = _month_of(np.clip(cand, START_MS, END_MS - 1))
        ok &= rng.random(len(todo)) < season[products["cat"][p], month]
        ts[todo[ok]] = cand[ok]
        todo = todo[~ok]
        if len(todo) == 0:
            break
    if len(todo):  # life cycle mostly outside 2018-2023: spread the rest over what is left
        lo = np.clip(products["launch"][prod[todo]], START_MS, END_MS - DAY_MS)
        ts[todo] = lo + (rng.random(len(todo)) * (END_MS - lo)).astype(np.int64)

    mean = 1.0 + 4.2 * products["quality"][prod]
    rating = np.clip(np.rint(mean + rng.normal(0.0, 1.0, n)), 1, 5).astype(np.int64)
    text_idx = rng.integers(0, _TEXTS_PER_RATING, n)
    title_idx = rng.integers(0, len(_REVIEW_TITLES[1]), n)
    text_null = rng.random(n) < 0.03
    users = (n_users * rng.random(n) ** 2).astype(np.int64)  # some users write many reviews
    variant = rng.random(n) < 0.3
    child = _asin_strings(prod * 4 + rng.integers(1, 4, n), products["salt"] + 7, prefix=b"B1")
    asin = pc.if_else(pa.array(variant), child, products["parent_asin"].take(prod))
    return {"prod": prod, "ts": ts, "rating": rating, "text_idx": text_idx,
            "title_idx": title_idx, "text_null": text_null, "user_id": _user_strings(users, seed),
            "asin": asin, "parent_asin": products["parent_asin"].take(prod),
            "helpful_vote": rng.negative_binomial(0.3, 0.5, n).astype(np.int64),
            "verified_purchase": rng.random(n) < 0.88, "seed": seed, "index": index}


def _pooled(texts: dict[int, dict[str, pa.Array]], rating: np.ndarray, idx: np.ndarray,
            key: str) -> pa.Array:
    """``texts[rating][key][idx]`` for every row, as one Arrow array."""
    pool = pa.concat_arrays([texts[r][key] for r in range(1, 6)])
    size = len(texts[1][key])
    return pool.take(pa.array((rating - 1) * size + idx % size))


def _long_fields(c: dict[str, Any], texts: dict[int, dict[str, pa.Array]],
                 pools: ReviewPools | None, json_text: bool) -> tuple[pa.Array, pa.Array]:
    """(text, title) of every row of chunk ``c``, plain or JSON-quoted; text null (or "null")
    where the chunk says so."""
    suffix = "_json" if json_text else ""
    if pools is None:
        text = _pooled(texts, c["rating"], c["text_idx"], "text" + suffix)
        title = _pooled(texts, c["rating"], c["title_idx"], "title" + suffix)
    else:
        picks = synth_sizes.review_picks(c["seed"], c["index"], len(c["ts"]))
        text = synth_sizes.pooled(pools.text_json if json_text else pools.text, c["rating"],
                                  picks.text)
        title = synth_sizes.pooled(pools.title_json if json_text else pools.title, c["rating"],
                                   picks.title)
    null = pa.scalar("null") if json_text else pa.nulls(len(text), pa.string())
    return pc.if_else(pa.array(c["text_null"]), null, text), title


def _images(c: dict[str, Any], pools: ReviewPools | None, json_text: bool) -> pa.Array | str:
    n = len(c["ts"])
    if pools is None:
        if json_text:
            return "[]"
        return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)),
                                        pa.array([], pa.string()))
    picks = synth_sizes.review_picks(c["seed"], c["index"], n)
    return (synth_sizes.images_json(pools, picks) if json_text
            else synth_sizes.images_list(pools, picks))


def _reviews_table(c: dict[str, Any], texts: dict[int, dict[str, pa.Array]],
                   pools: ReviewPools | None) -> pa.Table:
    text, title = _long_fields(c, texts, pools, json_text=False)
    return pa.table({
        "rating": pa.array(c["rating"].astype(np.float64)),
        "title": title,
        "text": text,
        "images": _images(c, pools, json_text=False),
        "asin": c["asin"], "parent_asin": c["parent_asin"], "user_id": c["user_id"],
        "timestamp": pa.array(c["ts"]), "helpful_vote": pa.array(c["helpful_vote"]),
        "verified_purchase": pa.array(c["verified_purchase"]),
    })


def _reviews_to_jsonl(c: dict[str, Any], texts: dict[int, dict[str, pa.Array]],
                      pools: ReviewPools | None) -> pa.Array:
    """One chunk as JSON lines (one string a row, each ending in a newline), built column-wise
    (every string here needs no escaping except the pooled ones, which are JSON-quoted once up
    front)."""
    rating_s = pa.array(["1.0", "2.0", "3.0", "4.0", "5.0"]).take(pa.array(c["rating"] - 1))
    text_j, title_j = _long_fields(c, texts, pools, json_text=True)
    images_j = _images(c, pools, json_text=True)
    verified = pa.array(["false", "true"]).take(pa.array(c["verified_purchase"].astype(np.int8)))
    images_part: list[Any] = ([',"images":[],"asin":"'] if isinstance(images_j, str) else
                              [',"images":', images_j, ',"asin":"'])
    return pc.binary_join_element_wise(
        '{"rating":', rating_s, ',"title":', title_j, ',"text":', text_j,
        *images_part, c["asin"], '","parent_asin":"', c["parent_asin"],
        '","user_id":"', c["user_id"], '","timestamp":', pa.array(c["ts"]).cast(pa.string()),
        ',"helpful_vote":', pa.array(c["helpful_vote"]).cast(pa.string()),
        ',"verified_purchase":', verified, "}\n", "")


def _joined(lines: pa.Array) -> pa.Buffer:
    """The bytes of a string array's values, back to back."""
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32, count=len(lines) + 1,
                            offset=lines.offset * 4)
    return lines.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))


def _file_rows(c: dict[str, Any], products: dict[str, Any], n_files: int) -> list[np.ndarray]:
    """Rows of chunk ``c`` per reviews file: file k has the categories c with c % n_files == k."""
    if n_files == 1:
        return [np.arange(len(c["ts"]))]
    group = products["cat"][c["prod"]] % n_files
    return [np.flatnonzero(group == k) for k in range(n_files)]


def _write_reviews(paths: list[Path], fmt: str, chunks: Iterator[dict[str, Any]],
                   products: dict[str, Any], texts: dict[int, dict[str, pa.Array]],
                   pools: ReviewPools | None) -> None:
    """Every chunk's rows into their file; all files under temporary names until the end."""
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(p)) for p in paths]
        if fmt == "parquet":
            _write_parquet(tmps, chunks, products, texts, pools)
        else:
            _write_jsonl_files(tmps, chunks, products, texts, pools, fmt == "jsonl.gz")


def _write_parquet(paths: list[Path], chunks: Iterator[dict[str, Any]],
                   products: dict[str, Any], texts: dict[int, dict[str, pa.Array]],
                   pools: ReviewPools | None) -> None:
    writers: list[pq.ParquetWriter | None] = [None] * len(paths)
    try:
        for c in chunks:
            table = _reviews_table(c, texts, pools)
            for k, rows in enumerate(_file_rows(c, products, len(paths))):
                w = writers[k]
                if w is None:
                    w = writers[k] = pq.ParquetWriter(paths[k], table.schema, compression="zstd")
                w.write_table(table.take(pa.array(rows)), row_group_size=CHUNK_ROWS)
    finally:
        for k, w in enumerate(writers):
            if w is None:  # a file without rows still gets the schema
                w = pq.ParquetWriter(paths[k], _reviews_schema(pools), compression="zstd")
            w.close()


def _reviews_schema(pools: ReviewPools | None) -> pa.Schema:
    images = synth_sizes.IMAGE_TYPE if pools is not None else pa.list_(pa.string())
    return pa.schema([("rating", pa.float64()), ("title", pa.string()), ("text", pa.string()),
                      ("images", images), ("asin", pa.string()), ("parent_asin", pa.string()),
                      ("user_id", pa.string()), ("timestamp", pa.int64()),
                      ("helpful_vote", pa.int64()), ("verified_purchase", pa.bool_())])


def _write_jsonl_files(paths: list[Path], chunks: Iterator[dict[str, Any]],
                       products: dict[str, Any], texts: dict[int, dict[str, pa.Array]],
                       pools: ReviewPools | None, compress: bool) -> None:
    """Chunks as JSON lines into ``paths`` (gzip level 1 when ``compress``); while one chunk is
    being compressed and written in a thread, the next one is built."""
    with contextlib.ExitStack() as stack:
        outs: list[BinaryIO | gzip.GzipFile] = []
        for path in paths:
            raw = stack.enter_context(open(path, "wb"))
            # No name and mtime 0 in the header: the same seed gives the same bytes.
            outs.append(stack.enter_context(gzip.GzipFile(
                filename="", fileobj=raw, mode="wb", compresslevel=1, mtime=0))
                if compress else raw)
        with ThreadPoolExecutor(1) as pool:
            pending: Future | None = None
            for c in chunks:
                lines = _reviews_to_jsonl(c, texts, pools)
                blocks = [_joined(lines if len(paths) == 1 else lines.take(pa.array(rows)))
                          for rows in _file_rows(c, products, len(paths))]
                if pending is not None:
                    pending.result()
                pending = pool.submit(_write_blocks, outs, blocks)
            if pending is not None:
                pending.result()


def _write_blocks(outs: list[BinaryIO | gzip.GzipFile], blocks: list[pa.Buffer]) -> None:
    for out, block in zip(outs, blocks, strict=True):
        if block.size:
            out.write(block)


def _write_jsonl(path: Path, blocks: Iterator[Any], compress: bool) -> None:
    """Write byte blocks to ``path`` (gzip level 1 when ``compress``)."""
    with open(path, "wb") as raw:
        out: BinaryIO | gzip.GzipFile = raw
        if compress:  # no name and mtime 0 in the header: the same seed gives the same bytes
            out = gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1, mtime=0)
        for block in blocks:
            out.write(block)
        if compress:
            out.close()


def _meta_table(products: dict[str, Any]) -> pa.Table:
    """Product metadata; average_rating and rating_number are what a full crawl would show."""
    cat = products["cat"]
    q = products["quality"]
    expected = products["weight"] * products["n_reviews"]
    main = np.array([c[1] for c in CATEGORIES], dtype=object)[cat]
    sub = np.array([c[2] for c in CATEGORIES], dtype=object)[cat]
    name = np.array([c[0] for c in CATEGORIES], dtype=object)[cat]
    brands = np.array(products["brands"], dtype=object)[products["brand"]]
    return pa.table({
        "main_category": pa.array(main, pa.string()),
        "title": products["title"],
        "average_rating": pa.array(np.round(np.clip(1.0 + 4.2 * q - 0.1, 1, 5), 1)),
        "rating_number": pa.array(np.rint(expected).astype(np.int64)),
        "features": pa.array([[f"{n}, {m}"] for n, m in zip(name, sub, strict=True)],
                             pa.list_(pa.string())),
        "categories": pa.array([[m, s, n] for m, s, n in zip(main, sub, name, strict=True)],
                               pa.list_(pa.string())),
        "store": pa.array(brands, pa.string()),
        "parent_asin": products["parent_asin"],
    })



#: Products per slice of realistic metadata: ~7 KB a record stays far below Arrow's 2 GB limit
#: of one string array.
_META_SLICE = 50_000


def _write_realistic_meta(path: Path, fmt: str, meta: pa.Table, products: dict[str, Any],
                          seed: int) -> None:
    """Metadata records of realistic size (:mod:`hpcpipe.steps.synth_sizes`): the compact
    columns plus features, description, price, images, videos and details; written a slice of
    products at a time."""
    pools = synth_sizes.meta_pools(seed, [(c[0], c[2]) for c in CATEGORIES])
    flat = [e for per_cat in pools for e in per_cat]
    take = products["cat"] * synth_sizes.META_PER_CATEGORY + synth_sizes.meta_picks(
        seed, products["n"])
    price_rng = np.random.default_rng([seed, 14])
    price = np.round(np.exp(price_rng.normal(3.0, 0.8, products["n"])), 2)
    no_price = price_rng.random(products["n"]) < 0.3
    slices = range(0, products["n"], _META_SLICE)
    if fmt == "parquet":
        image = pa.struct([(k, pa.string()) for k in ("thumb", "large", "hi_res", "variant")])
        pool = {"features": pa.array([e["features"] for e in flat], pa.list_(pa.string())),
                "description": pa.array([e["description"] for e in flat], pa.list_(pa.string())),
                "images": pa.array([e["images"] for e in flat], pa.list_(image)),
                "details": pa.array([json.dumps(e["details"]) for e in flat], pa.string())}
        writer: pq.ParquetWriter | None = None
        try:
            for lo in slices:
                part = meta.slice(lo, _META_SLICE)
                pick = pa.array(take[lo:lo + _META_SLICE])
                table = pa.table({
                    "main_category": part.column("main_category"), "title": part.column("title"),
                    "average_rating": part.column("average_rating"),
                    "rating_number": part.column("rating_number"),
                    "features": pool["features"].take(pick),
                    "description": pool["description"].take(pick),
                    "price": pa.array(price[lo:lo + _META_SLICE],
                                      mask=no_price[lo:lo + _META_SLICE]),
                    "images": pool["images"].take(pick),
                    "videos": pa.array([[]] * part.num_rows, pa.list_(pa.string())),
                    "store": part.column("store"), "categories": part.column("categories"),
                    "details": pool["details"].take(pick),
                    "parent_asin": part.column("parent_asin"),
                })
                if writer is None:
                    writer = pq.ParquetWriter(path, table.schema, compression="zstd")
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
        return

    def quoted(values: Any) -> pa.Array:
        return pa.array([json.dumps(v, separators=(",", ":")) for v in values], pa.string())

    pool_json = {k: quoted(e[k] for e in flat)
                 for k in ("features", "description", "images", "details")}

    def lines(lo: int) -> pa.Buffer:
        part = meta.slice(lo, _META_SLICE)
        pick = pa.array(take[lo:lo + _META_SLICE])
        price_s = pc.if_else(pa.array(no_price[lo:lo + _META_SLICE]), pa.scalar("null"),
                             pa.array(price[lo:lo + _META_SLICE]).cast(pa.string()))
        joined = pc.binary_join_element_wise(
            '{"main_category":', quoted(part.column("main_category").to_pylist()),
            ',"title":', quoted(part.column("title").to_pylist()),
            ',"average_rating":', part.column("average_rating").cast(pa.string()),
            ',"rating_number":', part.column("rating_number").cast(pa.string()),
            ',"features":', pool_json["features"].take(pick),
            ',"description":', pool_json["description"].take(pick),
            ',"price":', price_s, ',"images":', pool_json["images"].take(pick),
            ',"videos":[],"store":', quoted(part.column("store").to_pylist()),
            ',"categories":', quoted(part.column("categories").to_pylist()),
            ',"details":', pool_json["details"].take(pick),
            ',"parent_asin":"', part.column("parent_asin"), '","bought_together":null}\n', "")
        if isinstance(joined, pa.ChunkedArray):
            joined = joined.combine_chunks()
        return _joined(joined)

    _write_jsonl(path, (lines(lo) for lo in slices), fmt == "jsonl.gz")
