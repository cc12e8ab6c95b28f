"""The data loaders of the train step and the worker processes that fill them.

**Workers come from a fork server, never from a fork of the rank.** A rank has threads that enter
Python on their own: the process group's (gloo's run loop; NCCL's watchdog) take a new Python
thread state each time a collective's work object is freed, right after every all-reduce. Python
before 3.12 (CPython gh-112275; this project's CI runs 3.11.7) can fork while such a
thread holds the interpreter's thread-list lock, and the child then waits for that lock forever:
a loader worker hung at birth, the rank hung waiting for its first batch, and every other rank
in the next collective, silently until the time limit. Seen on the test cluster at an epoch's
evaluation (the eval loaders start their workers after the last all-reduce of the epoch), and
reproduced in about 4000 forks on 2 cores. The fork server is a fresh single-threaded process;
forking there is safe on every Python (it is Python 3.14's default start method for this reason).

What crosses into a worker is the pickled dataset: its arrays travel as shared memory or file
names, not bytes (``shared.py``). The server is started with the stop signals blocked, so it and
every worker forked from it are born ignoring them: only the training process acts on a stop.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import signal
from multiprocessing import resource_tracker

from torch.utils.data import DataLoader

from hpcpipe.steps.train.data import ForecastDataset, ResumableSampler, collate_batch

#: The signals that stop a job (scancel, time limit, preemption, ``hpcpipe cancel``, Ctrl-C).
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGUSR2})


def worker_context() -> multiprocessing.context.BaseContext:
    """The fork server's multiprocessing context, the server and multiprocessing's resource
    tracker (which cleans up the workers' queues) started, once per process, with
    :data:`STOP_SIGNALS` blocked; call it before anything else starts the tracker.

    A mask is inherited through exec and by forks, so neither helper nor any worker is stopped
    by ``scancel --signal=USR2`` or a SIGTERM to the whole job (the tracker, killed by USR2,
    would be relaunched without its records and print a traceback per queue). Blocking the
    signals in this thread for the moment of the start loses none: the process's other threads
    take them meanwhile. The tracker unblocks SIGINT and SIGTERM in the calling thread when it
    starts one (and ignores them itself): hence the second block.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # torch and numpy imported once, not per worker
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    return ctx


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: the workers ignore SIGTERM, SIGINT and SIGUSR2.

    scancel, a time limit, preemption and ``hpcpipe cancel`` signal every process of the job,
    the loader's workers included; a worker that died of it would fail the rank ("DataLoader
    worker ... exited unexpectedly") before it can checkpoint. Only the training process acts on
    a stop signal: it checkpoints at the next step, then ends its workers itself. The workers
    are born with the signals blocked (:func:`worker_context`); ignoring them as well keeps them
    ignored should anything unblock them. A worker still exits when its parent dies (torch
    watches for that) and on SIGKILL, which Slurm sends after KillWait.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _workers(dataset: ForecastDataset, num_workers: int) -> dict:
    """The DataLoader arguments that start ``num_workers`` worker processes (none for 0), the
    dataset's arrays moved into shared memory for them."""
    if not num_workers:
        return {"num_workers": 0}
    dataset.share_memory()
    return {"num_workers": num_workers, "multiprocessing_context": worker_context(),
            "worker_init_fn": ignore_stop_signals}


def train_loader(dataset: ForecastDataset, sampler: ResumableSampler, batch_size: int,
                 num_workers: int, cuda: bool) -> DataLoader:
    """Batches of ``sampler``'s share; workers that persist over epochs."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      pin_memory=cuda, collate_fn=collate_batch,
                      persistent_workers=num_workers > 0, **_workers(dataset, num_workers))


def eval_loader(dataset: ForecastDataset, batch_size: int, num_workers: int,
                cuda: bool) -> DataLoader:
    """Every row of ``dataset`` once, in order; workers started for each pass."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=cuda,
                      collate_fn=collate_batch, **_workers(dataset, num_workers))
