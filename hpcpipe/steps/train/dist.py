"""The distributed side of training: process group from the environment, collectives, signals.

One process per GPU. Under ``srun`` the rank comes from ``SLURM_PROCID``/``SLURM_LOCALID``/
``SLURM_NTASKS``; under ``torchrun`` from ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` (these win when
both are set, since torchrun may itself run inside an allocation). A single process needs no
process group at all, and every helper here works without one.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hpcpipe.steps.train.stop import StopSignals

log = logging.getLogger(__name__)

#: Seconds the ranks wait for Slurm to end them after a requeue was accepted. Exiting at once
#: would let the batch script finish first and the job could be seen as COMPLETED.
REQUEUE_GRACE_S = 60.0


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else None


def ranks_from_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's or Slurm's variables; (0, 0, 1) otherwise."""
    world = _env_int("WORLD_SIZE")
    if world is not None and _env_int("RANK") is not None:
        rank = _env_int("RANK") or 0
        return rank, _env_int("LOCAL_RANK") or 0, world
    ntasks = _env_int("SLURM_NTASKS")
    if ntasks is not None and ntasks > 1 and _env_int("SLURM_PROCID") is not None:
        return _env_int("SLURM_PROCID") or 0, _env_int("SLURM_LOCALID") or 0, ntasks
    return 0, 0, 1


def master_addr() -> str:
    """The rendezvous host: ``MASTER_ADDR``, else the first node of the Slurm allocation."""
    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    from hpcpipe.scheduler import slurm as scheduler

    first = scheduler.call(["scontrol", "show", "hostnames", nodelist]).split()[0]
    try:
        return socket.gethostbyname(first)
    except OSError:
        return first  # let the backend try the name; its error will name the host


def master_port() -> int:
    """``MASTER_PORT``, else one derived from the job id so concurrent jobs on a node differ."""
    if os.environ.get("MASTER_PORT"):
        return int(os.environ["MASTER_PORT"])
    job_id = _env_int("SLURM_JOB_ID") or 0
    return 15000 + job_id % 20000


def setup() -> DistEnv:
    """Join the process group described by the environment and pick this rank's device.

    NCCL with ``cuda:<local rank>`` where CUDA works, gloo on CPU otherwise
    (``CUDA_VISIBLE_DEVICES`` may be set on a node without a usable GPU).
    """
    rank, local_rank, world = ranks_from_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    env = DistEnv(rank, local_rank, world, device, None)
    if world > 1:
        addr, port = master_addr(), master_port()
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
        log.info("rank %d/%d joins %s process group at %s:%d on %s", rank, world, backend, addr,
                 port, device)
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
        env.backend = backend
    return env


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.backend == "nccl":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    return _all_reduce(env, values, dist.ReduceOp.SUM)


def all_reduce_max(env: DistEnv, values: list[float]) -> list[float]:
    """Element-wise maximum of ``values`` over all ranks (float64)."""
    return _all_reduce(env, values, dist.ReduceOp.MAX)


def _all_reduce(env: DistEnv, values: list[float], op: Any) -> list[float]:
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_gather_object(env: DistEnv, obj: Any) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# Stop signals (the flags live in hpcpipe.steps.train.stop): the ranks agree on them at a step boundary.


def agreed_stop(env: DistEnv, signals: StopSignals) -> tuple[bool, bool]:
    """(usr2, term) as seen by any rank; every rank must call this at the same point."""
    usr2, term = all_reduce_max(env, [float(signals.usr2), float(signals.term)])
    return usr2 > 0, term > 0


def slurm_job_id() -> str | None:
    """The Slurm job this process runs in (None outside Slurm)."""
    return os.environ.get("SLURM_JOB_ID") or None


def requeue(job_id: str) -> None:
    """Ask Slurm to requeue ``job_id``; raises SchedulerError when refused.

    Kept as one small function so the scheduler integration can be swapped in one place.
    """
    from hpcpipe.scheduler import slurm as scheduler

    scheduler.requeue(job_id)


def wait_to_be_ended(signals: StopSignals, seconds: float = REQUEUE_GRACE_S) -> None:
    """Sleep until Slurm's SIGTERM for the requeue arrives (or ``seconds`` pass)."""
    deadline = time.monotonic() + seconds
    while not signals.term and time.monotonic() < deadline:
        time.sleep(0.5)
