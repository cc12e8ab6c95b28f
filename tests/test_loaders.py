"""The train step's loader workers: where they come from and what crosses into them.

A worker forked from a rank can hang at birth on Python before 3.12 (``loaders.py``): the workers
must come from the fork server, born with the stop signals blocked, and the dataset must reach
them as shared memory and file names, not as a copy of every array per worker.
"""

from __future__ import annotations

import io
import multiprocessing.forkserver as forkserver
import os
import pickle
import signal
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest

from hpcpipe.errors import InputError
from hpcpipe.steps.train import data, loaders, shared

ROWS, PRODUCTS = 200_000, 5_000


def dataset(tmp_path: Path, with_tokens: bool = True) -> data.ForecastDataset:
    """A dataset as the recipe builds one: tables shared in memory, tokens memory-mapped."""
    rng = np.random.default_rng(0)
    numeric = rng.standard_normal((ROWS, len(data.NUMERIC_NAMES)), dtype=np.float32)
    product = rng.integers(0, PRODUCTS, ROWS).astype(np.int64)
    target = rng.poisson(2.0, ROWS).astype(np.float64)
    history = data.History(rng.random((PRODUCTS, 60), dtype=np.float32),
                           rng.integers(0, 60, ROWS).astype(np.int64), 2700)
    tokens = None
    if with_tokens:
        np.save(tmp_path / "ids.npy", rng.integers(1, 1000, (PRODUCTS, 16)).astype(np.int32))
        np.save(tmp_path / "lengths.npy", rng.integers(1, 17, PRODUCTS).astype(np.int32))
        tokens = data.Tokens(np.load(tmp_path / "ids.npy", mmap_mode="r"),
                             np.load(tmp_path / "lengths.npy", mmap_mode="r"), tmp_path, "k")
    return data.ForecastDataset(np.arange(0, ROWS, 3), numeric, target, product, tokens,
                                with_rows=True, history=history)


def status_mask(pid: int, field: str) -> int:
    """A signal mask of /proc/PID/status (SigBlk, SigIgn) as an int."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} for {pid}")


def bits(signals: frozenset[signal.Signals]) -> int:
    return sum(1 << (int(s) - 1) for s in signals)


def batches_equal(a: data.Batch, b: data.Batch) -> bool:
    return a.arrays.keys() == b.arrays.keys() and all(
        np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)


def test_workers_come_from_the_fork_server_born_blocking_the_stop_signals(tmp_path: Path) -> None:
    ds = dataset(tmp_path)
    it = iter(loaders.eval_loader(ds, 512, 2, cuda=False))
    try:
        got = [next(it), next(it)]  # one from each worker; they live until the last batch
        for pid in [w.pid for w in it._workers]:  # type: ignore[attr-defined]
            # Not a fork of this (multi-threaded) process: a child of the fork server.
            assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) \
                != os.getpid()
            assert status_mask(pid, "SigBlk") & bits(loaders.STOP_SIGNALS) == \
                bits(loaders.STOP_SIGNALS)
            assert status_mask(pid, "SigIgn") & bits(loaders.STOP_SIGNALS) == \
                bits(loaders.STOP_SIGNALS)
        got += list(it)
    finally:
        it._shutdown_workers()  # type: ignore[attr-defined]
    server = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    assert status_mask(server, "SigBlk") & bits(loaders.STOP_SIGNALS) == bits(loaders.STOP_SIGNALS)
    # This process's own mask is as it was: it still takes the stop signals.
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, []) & loaders.STOP_SIGNALS
    want = list(loaders.eval_loader(ds, 512, 0, cuda=False))
    assert len(got) == len(want) and all(map(batches_equal, got, want))


def test_the_dataset_reaches_a_worker_as_shared_memory_and_file_names(tmp_path: Path) -> None:
    ds = dataset(tmp_path)
    plain = io.BytesIO()
    pickle.dump(ds, plain)
    assert plain.tell() > ds.numeric.nbytes  # before: every array travels as its bytes

    ds.share_memory()
    buf = io.BytesIO()
    ForkingPickler(buf).dump(ds)
    assert buf.tell() < 20_000, buf.tell()
    back = pickle.loads(buf.getvalue())
    for name in ("index", "numeric", "target", "product"):
        assert np.array_equal(getattr(back, name), getattr(ds, name)), name
    assert np.array_equal(back.history.counts, ds.history.counts)
    assert np.array_equal(back.tokens.ids, ds.tokens.ids)
    assert isinstance(back.tokens.ids, np.memmap)
    assert batches_equal(back.__getitems__([5, 9, 700]), ds.__getitems__([5, 9, 700]))


def test_tables_passed_shared_are_shared_once(tmp_path: Path) -> None:
    ds = dataset(tmp_path, with_tokens=False)
    numeric = shared.shared(ds.numeric)
    assert shared.shared(numeric) is numeric
    a = data.ForecastDataset(ds.index, numeric, ds.target, ds.product)
    b = data.ForecastDataset(ds.index[:10], numeric, ds.target, ds.product)
    a.share_memory()
    b.share_memory()
    assert a.numeric is b.numeric is numeric


def test_too_little_shared_memory_is_refused_with_the_setting_to_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = dataset(tmp_path, with_tokens=False)
    monkeypatch.setattr(shared, "shm_free_bytes", lambda: 1_000_000)
    with pytest.raises(InputError, match=r"train\.num_workers=0") as err:
        loaders.eval_loader(ds, 512, 1, cuda=False)
    assert "/dev/shm" in str(err.value)
