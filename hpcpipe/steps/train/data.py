"""Training data: weekly feature rows joined to product text, split by time, normalised, batched.

* Rows come from ``features/bucket=*/part-0.parquet``; the text of a product (main_category and
  title) from ``ingest/products.parquet``. Rows index into the product table, so a product's text is
  stored and tokenized once, however many weeks it has.
* Rows whose ``target_next_n`` is null (the data set's last week) are the prediction rows.
* The last ``val_weeks`` weeks before the last week are validation; training uses the weeks before
  (only the last ``train_weeks`` of them when that is set).
* Numeric features: counts through log1p, then standardised with statistics of the training weeks;
  the calendar of the week forecast (derived from the week column).
* History (:class:`History`): each row's product's weekly counts of the last ``HISTORY_WEEKS``
  weeks, gathered per batch from one dense table.
* Token ids are cached under ``train/`` as memory-mapped .npy, keyed by the tokenizer files, the
  product texts and max_length: epochs and later runs never tokenize again. With a frozen encoder
  its pooled output per product is cached the same way.

This module uses the model's tokenizer and encoder (``model.py``) to build those caches; the model
knows nothing of the data, so the two import in one direction only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from hpcpipe.errors import InputError
from hpcpipe.files import atomic_path, is_temp
from hpcpipe.run.layout import RunLayout
from hpcpipe.steps.train.model import (
    Forecaster,
    encoder_fingerprint,
    load_tokenizer,
    mean_pool,
    month_shares,
    tokenizer_fingerprint,
    week_number,
)
from hpcpipe.steps.train.shared import SharesArrays, shared

log = logging.getLogger(__name__)

#: Numeric input columns of the features table and whether they are counts (log1p first).
FEATURE_COLUMNS: tuple[tuple[str, bool], ...] = (
    ("n_reviews", True), ("mean_rating", False), ("rating_std", False), ("share_5", False),
    ("share_1", False), ("helpful_votes", True), ("verified_share", False),
    ("mean_text_chars", True), ("lag_1", True), ("lag_2", True), ("lag_4", True),
    ("roll_mean_4", True), ("roll_mean_12", True), ("roll_rating_12", False),
    ("weeks_since_first", True), ("cum_reviews", True),
)
#: Columns derived here: rating_std is null for single reviews; the calendar of the target week
#: (its point on the year's circle, and the share of its days in each month).
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DERIVED_COLUMNS: tuple[str, ...] = (("rating_std_missing", "season_sin", "season_cos")
                                    + tuple(f"target_in_{m}" for m in MONTHS))
#: Weeks of a product's own weekly counts the model reads (this week and the 51 before).
HISTORY_WEEKS = 52
NUMERIC_NAMES: tuple[str, ...] = tuple(c for c, _ in FEATURE_COLUMNS) + DERIVED_COLUMNS


@dataclass
class Rows:
    """All feature rows of a run, in memory as numpy arrays (one entry per product-week)."""

    products: np.ndarray  # (P,) parent_asin, object
    texts: list[str]  # (P,) text fed to the encoder
    product: np.ndarray  # (N,) int32 index into products
    week: np.ndarray  # (N,) datetime64[D], Monday of the week
    numeric: np.ndarray  # (N, F) float32, log1p applied, not yet standardised
    n_reviews: np.ndarray  # (N,) float64, for the "same as this week" baseline
    roll_mean_4: np.ndarray  # (N,) float64, for the 4-week-mean baseline
    roll_mean_12: np.ndarray  # (N,) float64, for the 12-week-mean baseline
    target: np.ndarray  # (N,) float64, NaN where unknown (prediction rows)
    category: np.ndarray | None = None  # (P,) main_category per product ("" if none), object

    def __len__(self) -> int:
        return len(self.product)


def _feature_files(folder: Path) -> list[Path]:
    if not (folder / "manifest.json").is_file():
        raise InputError(f"{folder}: no manifest.json, so the features step has not finished; "
                         "run (or rerun) the features step first")
    files = sorted(p for p in folder.glob("bucket=*/*.parquet")
                   if not is_temp(p) and not is_temp(p.parent))
    if not files:
        raise InputError(f"{folder}: no bucket=*/part-0.parquet files; rerun the features step")
    return files


def product_text(title: Any, category: Any) -> str:
    """The text the encoder reads for a product: "<main_category>: <title>"."""
    title = "" if title is None else str(title)
    return f"{category}: {title}" if category else title


def load_rows(layout: RunLayout) -> Rows:
    """Read every feature row and the product texts of the run."""
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.compute as pc  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    wanted = ["parent_asin", "week", "target_next_n"] + [c for c, _ in FEATURE_COLUMNS]
    tables = []
    for path in _feature_files(layout.features):
        table = pq.read_table(path)
        missing = [c for c in wanted if c not in table.column_names]
        if missing:
            raise InputError(f"{path}: columns {missing} are missing; the features step must "
                             "write the columns of docs/contracts.md (rerun it)")
        tables.append(table.select(wanted))
    feats = pa.concat_tables(tables).combine_chunks() if tables else None
    if feats is None or feats.num_rows == 0:
        raise InputError(f"{layout.features}: the feature files hold no rows; check the input")

    products_path = layout.ingest / "products.parquet"
    if not products_path.is_file():
        raise InputError(f"{products_path} does not exist; run the ingest step first")
    prod = pq.read_table(products_path, columns=["parent_asin", "title", "main_category"])
    prod = prod.filter(pc.is_valid(prod["parent_asin"]))
    asins = prod["parent_asin"].to_pylist()
    categories = ["" if c is None else str(c) for c in prod["main_category"].to_pylist()]
    texts = [product_text(t, c) for t, c in zip(prod["title"].to_pylist(), categories,
                                                 strict=True)]
    index = pc.index_in(feats["parent_asin"], value_set=prod["parent_asin"])
    if index.null_count:
        # Products with reviews but no metadata: learn from their numbers with an empty text.
        unknown = pc.unique(feats["parent_asin"].filter(pc.is_null(index))).to_pylist()
        log.warning("%d products have features but no metadata; their text is empty",
                    len(unknown))
        asins += unknown
        texts += [""] * len(unknown)
        categories += [""] * len(unknown)
        index = pc.index_in(feats["parent_asin"], value_set=pa.array(asins, pa.string()))

    week = feats["week"].to_numpy(zero_copy_only=False).astype("datetime64[D]")

    def f64(name: str) -> np.ndarray:
        return feats[name].to_numpy(zero_copy_only=False).astype(np.float64)

    return Rows(
        products=np.array(asins, dtype=object),
        texts=texts,
        product=index.to_numpy(zero_copy_only=False).astype(np.int32),
        week=week,
        numeric=_numeric_features(feats, week),
        n_reviews=f64("n_reviews"),
        roll_mean_4=np.nan_to_num(f64("roll_mean_4"), nan=0.0),
        roll_mean_12=np.nan_to_num(f64("roll_mean_12"), nan=0.0),
        target=f64("target_next_n"),
        category=np.array(categories, dtype=object),
    )


def _numeric_features(feats: Any, week: np.ndarray) -> np.ndarray:
    """The (N, F) float32 inputs of NUMERIC_NAMES from the feature table (a pyarrow Table)."""
    numeric = np.zeros((feats.num_rows, len(NUMERIC_NAMES)), dtype=np.float32)
    for j, (name, is_count) in enumerate(FEATURE_COLUMNS):
        col = feats[name].to_numpy(zero_copy_only=False).astype(np.float64)
        if name == "rating_std":
            numeric[:, NUMERIC_NAMES.index("rating_std_missing")] = np.isnan(col)
        col = np.nan_to_num(col, nan=0.0)
        numeric[:, j] = np.log1p(np.maximum(col, 0.0)) if is_count else col
    # Season of the week being predicted (the next one), as a point on the unit circle.
    target_week = week + np.timedelta64(7, "D")
    year_start = target_week.astype("datetime64[Y]").astype("datetime64[D]")
    angle = 2 * np.pi * (target_week - year_start).astype(np.float64) / 365.25
    numeric[:, NUMERIC_NAMES.index("season_sin")] = np.sin(angle)
    numeric[:, NUMERIC_NAMES.index("season_cos")] = np.cos(angle)
    first = NUMERIC_NAMES.index("target_in_jan")
    numeric[:, first:first + 12] = month_shares(week_number(target_week))
    return numeric


@dataclass
class History(SharesArrays):
    """Every product's weekly review counts as one dense (P, W) table, so that a batch gathers
    each row's last ``HISTORY_WEEKS`` weeks in one numpy indexing (no per-row arrays: 2M reviews
    make ~1M rows but only ~25k x 313 cells). Weeks before a product's first review are -1 (the
    model leaves them out of its averages); weeks without a feature row after it are 0.
    """

    counts: np.ndarray  # (P, W) float32
    column: np.ndarray  # (N,) int64: each row's week as a column of ``counts``
    first_week: int  # absolute week number (model.week_number) of column 0
    weeks: int = HISTORY_WEEKS

    @classmethod
    def from_rows(cls, rows: Rows, weeks: int = HISTORY_WEEKS) -> History:
        number = week_number(rows.week)
        first_week = int(number.min()) if len(number) else 0
        column = number - first_week
        n_cols = int(column.max()) + 1 if len(column) else 1
        counts = np.zeros((len(rows.products), n_cols), dtype=np.float32)
        counts[rows.product, column] = rows.n_reviews
        first_col = np.full(len(rows.products), n_cols, dtype=np.int64)
        np.minimum.at(first_col, rows.product, column)
        counts[np.arange(n_cols)[None, :] < first_col[:, None]] = -1.0
        return cls(counts, column.astype(np.int64), first_week, weeks)

    def share_memory(self) -> None:
        """Move the tables into shared memory (see :meth:`ForecastDataset.share_memory`)."""
        self.counts, self.column = shared(self.counts), shared(self.column)

    def window(self, rows: np.ndarray, product: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(counts (B, weeks) float32 from this week back, -1 before the first review; the
        rows' absolute week numbers (B,) int64)."""
        col = self.column[rows]
        lag = col[:, None] - np.arange(self.weeks)[None, :]
        out = self.counts[np.asarray(product, dtype=np.int64)[:, None], np.maximum(lag, 0)]
        out[lag < 0] = -1.0
        return out, col + self.first_week


@dataclass
class Split:
    """Row indices of each part and the weeks that bound them.

    ``train`` is every training week (normalisation statistics, LightGBM's rows); the model
    learns from ``fit``, its first weeks, and the best epoch is chosen on ``inner``, the last
    ``inner_weeks`` training weeks, held out: the validation weeks are only ever reported.
    """

    train: np.ndarray
    val: np.ndarray
    last_week: np.datetime64
    val_start: np.datetime64
    train_start: np.datetime64 | None
    fit: np.ndarray
    inner: np.ndarray
    inner_start: np.datetime64
    inner_weeks: int

    def describe(self) -> dict[str, Any]:
        return {"train_rows": len(self.train), "val_rows": len(self.val),
                "last_week": str(self.last_week), "val_start": str(self.val_start),
                "train_start": None if self.train_start is None else str(self.train_start),
                "fit_rows": len(self.fit), "inner_rows": len(self.inner),
                "inner_start": str(self.inner_start), "inner_weeks": self.inner_weeks}


def inner_weeks_for(val_weeks: int, train_weeks: int) -> int:
    """Weeks held out at the end of the training weeks to choose the epoch on: as many as the
    validation weeks (the same horizon), but at most a quarter of the training weeks."""
    return max(1, min(val_weeks, train_weeks // 4))


def split_by_time(rows: Rows, val_weeks: int, train_weeks: int = 0) -> Split:
    """Validation: the ``val_weeks`` weeks before the last week; training: the weeks before,
    the last of which (:func:`inner_weeks_for`) are held out to choose the epoch on."""
    last_week = rows.week.max()
    val_start = last_week - np.timedelta64(7 * val_weeks, "D")
    known = ~np.isnan(rows.target)
    train = known & (rows.week < val_start)
    train_start = None
    if train_weeks > 0:
        train_start = val_start - np.timedelta64(7 * train_weeks, "D")
        train &= rows.week >= train_start
    val = known & (rows.week >= val_start)
    n_train_weeks = len(np.unique(rows.week[train]))
    inner_weeks = inner_weeks_for(val_weeks, n_train_weeks)
    inner_start = val_start - np.timedelta64(7 * inner_weeks, "D")
    inner = train & (rows.week >= inner_start)
    out = Split(np.flatnonzero(train), np.flatnonzero(val), last_week, val_start, train_start,
                np.flatnonzero(train & ~inner), np.flatnonzero(inner), inner_start, inner_weeks)
    if len(out.fit) == 0 or len(out.inner) == 0 or len(out.val) == 0:
        raise InputError(
            f"time split leaves {len(out.fit)} training rows, {len(out.inner)} held out to "
            f"choose the epoch on and {len(out.val)} validation rows "
            f"(weeks {rows.week.min()} to {last_week}, train.val_weeks={val_weeks}, "
            f"train.train_weeks={train_weeks}); lower train.val_weeks or provide more weeks")
    return out


@dataclass
class Normalizer:
    """Standardisation of the numeric inputs with statistics of the training weeks."""

    names: list[str]
    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, numeric: np.ndarray) -> Normalizer:
        mean = numeric.astype(np.float64).mean(axis=0)
        std = numeric.astype(np.float64).std(axis=0)
        std[std < 1e-8] = 1.0
        return cls(list(NUMERIC_NAMES), mean.tolist(), std.tolist())

    def transform(self, numeric: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return ((numeric - mean) / std).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "mean": self.mean, "std": self.std,
                "log1p": [c for c, is_count in FEATURE_COLUMNS if is_count]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalizer:
        if list(d["names"]) != list(NUMERIC_NAMES):
            raise InputError(f"normalization statistics name the features {d['names']}, this "
                             f"version uses {list(NUMERIC_NAMES)}; retrain the model")
        return cls(list(d["names"]), list(d["mean"]), list(d["std"]))


# ---------------------------------------------------------------------------------------------
# Caches under train/: token ids per product, and pooled encoder output for a frozen encoder.


@dataclass
class Tokens(SharesArrays):
    """Token ids of every product (right padded to max_length) and their lengths, memory-mapped."""

    ids: np.ndarray  # (P, max_length) int32
    lengths: np.ndarray  # (P,) int32
    path: Path
    key: str


def rows_fingerprint(rows: Rows) -> str:
    """A hash of the feature data as training reads it (products, texts, weeks, inputs,
    targets): equal for the same data however often features were recomputed, different for
    other data. About 1 s per GB of rows."""
    h = hashlib.blake2b(digest_size=12)
    h.update(texts_fingerprint(rows.products, rows.texts).encode())
    for arr in (rows.product, rows.week.view(np.int64), rows.numeric, rows.target):
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).data)  # no copy: the buffer itself
    return h.hexdigest()


def texts_fingerprint(products: np.ndarray, texts: list[str]) -> str:
    h = hashlib.sha1()
    for asin, text in zip(products, texts, strict=True):
        h.update(f"{asin}\x1f{text}\x1e".encode())
    return h.hexdigest()[:12]


def tokenize_products(tokenizer: Any, texts: list[str], max_length: int,
                      chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(ids, lengths) of ``texts``: int32 ids right-padded to ``max_length``."""
    tokenizer.padding_side = "right"
    ids = np.zeros((len(texts), max_length), dtype=np.int32)
    lengths = np.zeros(len(texts), dtype=np.int32)
    for start in range(0, len(texts), chunk):
        enc = tokenizer(texts[start:start + chunk], max_length=max_length, truncation=True,
                        padding="max_length", return_attention_mask=True, return_tensors="np")
        ids[start:start + chunk] = enc["input_ids"]
        lengths[start:start + chunk] = enc["attention_mask"].sum(axis=1)
    return ids, lengths


def token_cache(train_dir: Path, tokenizer_dir: Path, rows: Rows, max_length: int,
                is_main: bool, barrier: Callable[[], None]) -> Tokens:
    """The cached token ids for ``rows.products``; rank 0 builds them when absent."""
    name = tokenizer_dir.name.replace(" ", "_")[:40]
    key = (f"{name}-{tokenizer_fingerprint(tokenizer_dir)}-"
           f"{texts_fingerprint(rows.products, rows.texts)}-L{max_length}")
    path = Path(train_dir) / f"tokens-{key}"
    if is_main and not (path / "meta.json").is_file():
        tokenizer = load_tokenizer(tokenizer_dir)
        ids, lengths = tokenize_products(tokenizer, rows.texts, max_length)
        with atomic_path(path) as tmp:
            tmp.mkdir(parents=True)
            for fname, arr in (("ids.npy", ids), ("lengths.npy", lengths)):
                with open(tmp / fname, "wb") as f:
                    np.save(f, arr)
            (tmp / "meta.json").write_text(json.dumps({
                "tokenizer": str(tokenizer_dir), "max_length": max_length,
                "products": len(rows.products), "pad_token_id": tokenizer.pad_token_id or 0,
            }))
        log.info("tokenized %d product texts into %s", len(rows.texts), path)
    barrier()
    return Tokens(np.load(path / "ids.npy", mmap_mode="r"),
                  np.load(path / "lengths.npy", mmap_mode="r"), path, key)


def embedding_cache(train_dir: Path, encoder_key: str, tokens: Tokens, is_main: bool,
                    barrier: Callable[[], None],
                    embed: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Pooled encoder output of every product (for a frozen encoder), cached like the tokens.

    ``embed(ids, lengths)`` maps a batch of products to their (B, H) float32 vectors.
    """
    path = Path(train_dir) / f"embeddings-{encoder_key}-{tokens.key}.npy"
    if is_main and not path.is_file():
        n = len(tokens.lengths)
        order = np.argsort(tokens.lengths, kind="stable")  # similar lengths: little padding
        parts: dict[int, np.ndarray] = {}
        batch = 512
        for start in range(0, n, batch):
            sel = order[start:start + batch]
            parts[start] = embed(np.asarray(tokens.ids[sel]), np.asarray(tokens.lengths[sel]))
        dim = next(iter(parts.values())).shape[1] if parts else 0
        out = np.zeros((n, dim), dtype=np.float32)
        for start, vecs in parts.items():
            out[order[start:start + batch]] = vecs
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, out)
        log.info("encoded %d products once with the frozen encoder into %s", n, path)
    barrier()
    return np.load(path, mmap_mode="r")


def product_embeddings(train_dir: Path, folder: Path, tokens: Tokens, model: Forecaster,
                       device: torch.device, is_main: bool,
                       barrier: Callable[[], None]) -> np.ndarray:
    """Pooled output of the frozen encoder for every product, computed once and cached.

    Computed in fp32 (TF32 on CUDA), so the cache does not depend on the training precision.
    """
    encoder = model.encoder

    @torch.no_grad()
    def embed(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        width = max(1, int(lengths.max()))
        ids_t = torch.from_numpy(np.ascontiguousarray(ids[:, :width], dtype=np.int64)).to(device)
        mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]).long()
        out = encoder(input_ids=ids_t, attention_mask=mask.to(device))
        return mean_pool(out.last_hidden_state, mask.to(device)).float().cpu().numpy()

    was_training = encoder.training
    encoder.eval()
    try:
        return embedding_cache(train_dir, encoder_fingerprint(folder), tokens, is_main, barrier,
                               embed)
    finally:
        encoder.train(was_training)


# ---------------------------------------------------------------------------------------------
# Dataset, sampler, loaders.


class Batch:
    """A batch as numpy arrays until it reaches the training process.

    Loader workers pickle numpy arrays through their pipe; torch tensors would each need a
    shared-memory segment, about 9x slower for these small batches (measured on 2 CPU cores).
    The DataLoader's pin-memory thread calls ``pin_memory`` (CUDA); ``to`` makes the tensors.
    """

    def __init__(self, arrays: dict[str, np.ndarray | torch.Tensor]) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays["target"])

    def pin_memory(self, device: Any = None) -> Batch:
        return Batch({k: torch.as_tensor(v).pin_memory() for k, v in self.arrays.items()})

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The batch as tensors on ``device`` (asynchronous copies from pinned memory)."""
        return {k: torch.as_tensor(v).to(device, non_blocking=True)
                for k, v in self.arrays.items()}


class ForecastDataset(SharesArrays, Dataset):
    """Rows ``index`` of the normalised table; batches are gathered with numpy in one go.

    A batch is a dict: ``numeric`` (B, F), ``target`` (B,) the next week's count, and
    either ``input_ids``/``attention_mask`` cut to the batch's longest text or, without tokens
    (frozen encoder), ``product`` (B,): the model looks the pooled text up on its device, which
    keeps batches small. With ``history``: ``history`` (B, weeks) the product's last weekly
    counts and ``week`` (B,) the row's absolute week number. ``row`` (B,) is added with
    ``with_rows`` (for predictions).
    """

    def __init__(self, index: np.ndarray, numeric: np.ndarray, target: np.ndarray,
                 product: np.ndarray, tokens: Tokens | None = None,
                 with_rows: bool = False, history: History | None = None) -> None:
        self.index = np.asarray(index, dtype=np.int64)
        self.numeric = numeric
        self.target = np.nan_to_num(target, nan=0.0).astype(np.float32)
        self.product = product
        self.tokens = tokens
        self.with_rows = with_rows
        self.history = history

    def share_memory(self) -> None:
        """Move the arrays into shared memory, where they are not already (before the dataset
        is pickled into loader workers): pass the same ``numeric``, ``product`` and ``history``
        to several datasets already shared, and they share one copy."""
        for name in ("index", "numeric", "target", "product"):
            setattr(self, name, shared(getattr(self, name)))
        if self.history is not None:
            self.history.share_memory()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Batch:
        return self.__getitems__([i])

    def __getitems__(self, positions: list[int]) -> Batch:
        rows = self.index[np.asarray(positions, dtype=np.int64)]
        prod = self.product[rows]
        batch = {"numeric": self.numeric[rows], "target": self.target[rows]}
        if self.with_rows:
            batch["row"] = rows
        if self.history is not None:
            batch["history"], batch["week"] = self.history.window(rows, prod)
        if self.tokens is None:
            batch["product"] = prod.astype(np.int64)
        else:
            lengths = np.asarray(self.tokens.lengths[prod])
            # A multiple of 8 (tensor cores' tile), within the cached width.
            width = min(-(-max(1, int(lengths.max())) // 8) * 8, self.tokens.ids.shape[1])
            batch["input_ids"] = np.asarray(self.tokens.ids[prod, :width], dtype=np.int64)
            batch["attention_mask"] = (np.arange(width)[None, :] < lengths[:, None]).astype(
                np.int64)
        return Batch(batch)


def collate_batch(batch: Any) -> Batch:
    """The dataset already returns whole batches (``__getitems__``): a :class:`Batch`."""
    return batch


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (a checkpoint's sampler position).

    The permutation depends on seed and epoch only, and rank r takes every world_size-th index, so
    the global batch at a given step holds the same samples at every world size.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Next iteration covers ``epoch`` from this rank's ``start``-th sample on."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start
