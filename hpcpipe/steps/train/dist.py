"""The distributed side of training: the process group, collectives, and the agreed stop.

One process per GPU. Where this process sits (rank, local rank, world size, rendezvous address and
port) comes from the :class:`~hpcpipe.runtime.env.JobEnvironment` the job entry built: under
``srun`` from Slurm's variables, under ``torchrun`` from its own (which win when both are set). The
allocation's host list is expanded there, in Python, so no rank runs ``scontrol``. A single
process needs no process group at all, and every helper here works without one.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hpcpipe.runtime.env import JobEnvironment
from hpcpipe.steps.train.stop import StopReason, StopSignals

log = logging.getLogger(__name__)


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


def ranks(job: JobEnvironment) -> tuple[int, int, int]:
    """(rank, local rank, world size) of this process; (0, 0, 1) outside srun and torchrun."""
    return job.global_rank, job.local_rank, job.world_size


def setup(job: JobEnvironment) -> DistEnv:
    """Join the job's process group and pick this rank's device.

    NCCL with ``cuda:<local rank>`` where CUDA works, gloo on CPU otherwise
    (``CUDA_VISIBLE_DEVICES`` may be set on a node without a usable GPU).
    """
    rank, local_rank, world = ranks(job)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    env = DistEnv(rank, local_rank, world, device, None)
    if world > 1:
        addr, port = job.master_addr, job.master_port
        # env:// reads these two; setting them is also what torchrun would have done.
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


def agreed_stop(env: DistEnv, signals: StopSignals,
                diverged: bool = False) -> tuple[StopReason | None, bool]:
    """(why to stop now, whether some rank diverged), as seen by any rank; every rank calls this
    at the same point. (None, False): go on.

    The flags are set by signal handlers at any moment, and a non-finite loss is seen by one
    rank; agreeing on them at a step boundary in one all-reduce makes every rank stop (or fail)
    after the same step, so the checkpoint is one consistent state and no rank is left waiting
    in a collective.
    """
    usr2, term, bad = all_reduce_max(env, [float(signals.usr2), float(signals.term),
                                           float(diverged)])
    if usr2 > 0:
        return StopReason.WARNED, bad > 0
    return (StopReason.TERMINATED if term > 0 else None), bad > 0
