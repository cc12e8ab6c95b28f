"""Realistic byte sizes for the synthetic data: long review texts, image lists, full metadata.

Amazon Reviews'23 (Hou et al., 2024) publishes 571.54M reviews with 30.14B tokens of review text,
about 53 tokens per review, and 48.19M items with 63.66B tokens of metadata, about 1.3k per item.
The compact synthesis (``sizes="compact"``) writes ~10-word texts and no images, so a benchmark on
it understates the bytes ingest must decompress and parse. Here:

- review texts have a log-normal number of words (sigma 1.0, clipped at 2,000) whose mean is
  :data:`TEXT_TOKENS_MEAN`; words follow the rating as in the compact texts;
- review titles have a log-normal number of words with mean :data:`TITLE_TOKENS_MEAN` (the
  data set publishes no title figure; a few words is what its titles look like);
- :data:`IMAGE_SHARE` of the reviews carry 1-4 images, each a dict of three URLs like the
  data set's ``images`` field;
- metadata records carry ``features``, ``description``, ``images`` and ``details`` sized so that a
  record has about :data:`META_TOKENS_MEAN` words.

Everything is drawn from pools built once per seed and picked per row with their own random
stream, so the product, time and rating of every review (what ``generator_parameters``
describes) do not change with the sizes. A "token" is counted as a whitespace-separated word.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]

TEXT_TOKENS_MEAN = 53.0
TEXT_TOKENS_MAX = 2_000
TITLE_TOKENS_MEAN = 4.0
IMAGE_SHARE = 0.08
META_TOKENS_MEAN = 1_300.0
#: Pool sizes: large enough that the long tail is there and gzip finds few repeats in its window.
TEXTS_PER_RATING = 8_192
TITLES_PER_RATING = 1_024
IMAGE_LISTS = 2_048
META_PER_CATEGORY = 256

_WORDS = ("quality", "price", "size", "color", "battery", "box", "delivery", "fit", "sound",
          "material", "design", "handle", "cable", "screen", "button", "manual", "warranty",
          "weight", "smell", "texture", "packaging", "seller", "return", "replacement", "gift")
_VERBS = ("works", "feels", "looks", "arrived", "broke", "lasted", "fits", "charges", "holds",
          "cleans", "heats", "stays", "folds", "connects", "sounds")
_QUALIFIERS = ("really", "quite", "very", "a bit", "surprisingly", "honestly", "overall", "still",
               "definitely", "mostly")


def _lognormal_lengths(rng: np.random.Generator, n: int, mean: float, sigma: float,
                       cap: int) -> np.ndarray:
    """``n`` word counts (at least 1) whose mean is ``mean`` within a few percent."""
    mu = np.log(mean) - 0.5 * sigma * sigma
    raw = np.clip(rng.lognormal(mu, sigma, n), 1, cap)
    raw *= mean / raw.mean()  # the clip and the sample's own scatter move the mean: put it back
    return np.clip(np.rint(raw), 1, cap).astype(np.int64)


#: Generic sentences of four words ("Battery works really well.") mixed with the rating's phrases.
_GENERIC: list[list[str]] = [[w.capitalize(), v, q, how] for w in _WORDS for v in _VERBS
                             for q in _QUALIFIERS for how in ("well", "poorly")]


def _text_of(rng: np.random.Generator, words: int, phrases: list[str]) -> str:
    """A text of exactly ``words`` words: sentences, half the rating's phrases, half generic."""
    split = [p.split() for p in phrases]
    out: list[str] = []
    while len(out) < words:
        m = words // 2 + 2  # sentences have two words or more: enough in one draw
        own = rng.random(m) < 0.5
        a = rng.integers(0, len(split), m)
        b = rng.integers(0, len(_GENERIC), m)
        for i in range(m):
            sentence = split[a[i]] if own[i] else _GENERIC[b[i]]
            out += sentence[:-1]
            out.append(sentence[-1] + ".")
            if len(out) >= words:
                break
    out = out[:words]
    if not out[-1].endswith("."):
        out[-1] += "."
    return " ".join(out)


@dataclass(frozen=True)
class ReviewPools:
    """Per rating (1..5, index r-1): texts, titles as plain and JSON-quoted strings; image lists
    as JSON and as Arrow lists."""

    text: list[pa.Array]
    text_json: list[pa.Array]
    title: list[pa.Array]
    title_json: list[pa.Array]
    images_json: pa.Array
    images: pa.Array


IMAGE_TYPE = pa.list_(pa.struct([("small_image_url", pa.string()),
                                 ("medium_image_url", pa.string()),
                                 ("large_image_url", pa.string()),
                                 ("attachment_type", pa.string())]))


def _image(rng: np.random.Generator) -> dict[str, str]:
    key = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"),
                             size=11))
    base = f"https://images-na.ssl-images-amazon.com/images/I/{key}"
    return {"small_image_url": f"{base}._SL256_.jpg", "medium_image_url": f"{base}._SL800_.jpg",
            "large_image_url": f"{base}.jpg", "attachment_type": "IMAGE"}


def review_pools(seed: int, words: dict[int, list[str]], titles: dict[int, list[str]]
                 ) -> ReviewPools:
    """The pools for ``seed``; ``words`` and ``titles`` are the compact phrases per rating."""
    rng = np.random.default_rng([seed, 10])
    text, text_json, title, title_json = [], [], [], []
    for r in range(1, 6):
        lengths = _lognormal_lengths(rng, TEXTS_PER_RATING, TEXT_TOKENS_MEAN, 1.0,
                                     TEXT_TOKENS_MAX)
        texts = [_text_of(rng, int(k), words[r]) for k in lengths]
        tl = _lognormal_lengths(rng, TITLES_PER_RATING, TITLE_TOKENS_MEAN, 0.6, 30)
        heads = [str(rng.choice(titles[r])).rstrip("!") for _ in range(TITLES_PER_RATING)]
        ts = [" ".join((h.split() + _text_of(rng, int(k), words[r]).rstrip(".").split())[:int(k)])
              for h, k in zip(heads, tl, strict=True)]
        text.append(pa.array(texts, pa.string()))
        text_json.append(pa.array([json.dumps(t) for t in texts], pa.string()))
        title.append(pa.array(ts, pa.string()))
        title_json.append(pa.array([json.dumps(t) for t in ts], pa.string()))
    lists = [[_image(rng) for _ in range(int(rng.integers(1, 5)))] for _ in range(IMAGE_LISTS)]
    return ReviewPools(text, text_json, title, title_json,
                       pa.array([json.dumps(v, separators=(",", ":")) for v in lists], pa.string()),
                       pa.array(lists, IMAGE_TYPE))


@dataclass(frozen=True)
class ReviewPicks:
    """Which pool entry every row of a chunk takes (-1: no images)."""

    text: np.ndarray
    title: np.ndarray
    images: np.ndarray


def review_picks(seed: int, index: int, n: int) -> ReviewPicks:
    """Picks for chunk ``index`` of ``n`` rows, from a stream of their own."""
    rng = np.random.default_rng([seed, 11, index])
    text = rng.integers(0, TEXTS_PER_RATING, n)
    title = rng.integers(0, TITLES_PER_RATING, n)
    has = rng.random(n) < IMAGE_SHARE
    images = np.where(has, rng.integers(0, IMAGE_LISTS, n), -1)
    return ReviewPicks(text, title, images)


def pooled(pools: list[pa.Array], rating: np.ndarray, idx: np.ndarray) -> pa.Array:
    """``pools[rating - 1][idx]`` for every row, as one Arrow array."""
    size = len(pools[0])
    return pa.concat_arrays(pools).take(pa.array((rating - 1) * size + idx % size))


def images_json(pools: ReviewPools, picks: ReviewPicks) -> pa.Array:
    """The ``images`` field of every row as JSON text ("[]" for none)."""
    with_empty = pa.concat_arrays([pools.images_json, pa.array(["[]"], pa.string())])
    return with_empty.take(pa.array(np.where(picks.images < 0, IMAGE_LISTS, picks.images)))


def images_list(pools: ReviewPools, picks: ReviewPicks) -> pa.Array:
    """The ``images`` column of every row as Arrow lists (empty for none)."""
    with_empty = pa.concat_arrays([pools.images, pa.array([[]], IMAGE_TYPE)])
    return with_empty.take(pa.array(np.where(picks.images < 0, IMAGE_LISTS, picks.images)))


# ---------------------------------------------------------------------------------------------
# Metadata.


def _meta_pool_entry(rng: np.random.Generator, name: str, sub: str) -> dict[str, Any]:
    """One product's long fields; the word counts add up to about META_TOKENS_MEAN on average."""
    phrases = [f"this {name.lower()} is made for everyday use", f"the {sub.lower()} you need",
               "easy to clean and store", "backed by our satisfaction guarantee"]
    n_feat = int(rng.integers(3, 8))
    features = [_text_of(rng, int(k), phrases) for k in
                _lognormal_lengths(rng, n_feat, 25.0, 0.5, 200)]
    desc_words = int(_lognormal_lengths(rng, 1, META_TOKENS_MEAN * 0.7, 0.8, 20_000)[0])
    description = [_text_of(rng, max(1, desc_words // 3), phrases) for _ in range(3)]
    images = [{"thumb": i["small_image_url"], "large": i["large_image_url"],
               "hi_res": i["medium_image_url"], "variant": "MAIN" if j == 0 else f"PT0{j}"}
              for j, i in enumerate(_image(rng) for _ in range(int(rng.integers(2, 9))))]
    details = {"Package Dimensions": f"{rng.integers(2, 40)} x {rng.integers(2, 40)} x "
                                     f"{rng.integers(1, 20)} inches; {rng.integers(1, 90)} ounces",
               "Item model number": f"M{rng.integers(1000, 99999)}",
               "Date First Available": f"{['January', 'March', 'June', 'October'][rng.integers(4)]}"
                                       f" {rng.integers(1, 28)}, {rng.integers(2012, 2023)}",
               "Manufacturer": name.split()[0] + " Inc."}
    return {"features": features, "description": description, "images": images,
            "details": details}


def meta_pools(seed: int, categories: list[tuple[str, str]]) -> list[list[dict[str, Any]]]:
    """Per category (name, sub-category): META_PER_CATEGORY entries of long metadata fields."""
    rng = np.random.default_rng([seed, 12])
    return [[_meta_pool_entry(rng, name, sub) for _ in range(META_PER_CATEGORY)]
            for name, sub in categories]


def meta_picks(seed: int, n_products: int) -> np.ndarray:
    """Which pool entry (within its category's pool) every product takes."""
    return np.random.default_rng([seed, 13]).integers(0, META_PER_CATEGORY, n_products)
