"""The distributed side of training: the process group, collectives, and the agreed stop.

One process per GPU. Where this process sits (rank, local rank, world size, rendezvous address and
port) comes from the :class:`~hpcpipe.runtime.env.JobEnvironment` the job entry built: under
``srun`` from Slurm's variables, under ``torchrun`` from its own (which win when both are set). The
allocation's host list is expanded there, in Python, so no rank runs ``scontrol``. A single
process needs no process group at all, and every helper here works without one.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpcpipe.errors import HpcpipeError
from hpcpipe.files import write_json
from hpcpipe.runtime.env import ALLOW_CPU_ON_GPU_ALLOCATION, JobEnvironment
from hpcpipe.steps.train.stop import StopReason, StopSignals

log = logging.getLogger(__name__)

#: How long ranks wait for each other to join the process group.
JOIN_TIMEOUT = datetime.timedelta(minutes=30)


class GpuError(HpcpipeError):
    """The allocation's GPUs cannot be used as the job needs them: CUDA cannot see them, or two
    ranks would share one. Raised at start-up, before any training, saying how to fix it."""


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


def local_world_size(job: JobEnvironment) -> int | None:
    """How many ranks run on this node; None where unknown."""
    if job.vars.get("LOCAL_WORLD_SIZE", "").isdigit():  # torchrun
        return int(job.vars["LOCAL_WORLD_SIZE"])
    per_node = job.tasks_per_node
    return per_node[job.node_id] if job.under_srun and job.node_id < len(per_node) else None


def pick_device(job: JobEnvironment, cuda_available: bool | None = None,
                device_count: int | None = None) -> torch.device:
    """This rank's device: ``cuda:<i>`` with a GPU of its own, or the CPU where the job has no
    GPU. An allocation with GPUs that CUDA cannot use is a :class:`GpuError` (a GPU job would
    otherwise hold its GPUs and train on CPU for its whole time limit), unless
    ``HPCPIPE_ALLOW_CPU_ON_GPU_ALLOCATION=1`` says CPU training is meant."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        gpus = job.allocated_gpus
        if gpus and not job.cpu_on_gpu_allocation_allowed:
            raise GpuError(
                f"the allocation gives this rank GPU(s) {','.join(gpus)} but CUDA cannot use "
                f"them ({_why_no_cuda()}), so training would run on the CPU for the whole "
                "time limit. Fix the node's CUDA: check `nvidia-smi` in a job, install a torch "
                "build for the CUDA version of the node's driver (the site's module or wheel), "
                "load the site's CUDA module in slurm.setup. To train on "
                f"CPU on purpose, set {ALLOW_CPU_ON_GPU_ALLOCATION}=1 in the environment "
                "`hpcpipe submit` runs in (jobs inherit it).")
        if gpus:
            log.warning("CUDA cannot use GPU(s) %s (%s); training on CPU because %s=1",
                        ",".join(gpus), _why_no_cuda(), ALLOW_CPU_ON_GPU_ALLOCATION)
        return torch.device("cpu")
    count = torch.cuda.device_count() if device_count is None else device_count
    return torch.device("cuda", gpu_index(job.local_rank, count, local_world_size(job)))


def _why_no_cuda() -> str:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - its message is the diagnosis
        return f"torch {torch.__version__}, CUDA {torch.version.cuda}: {exc}".strip()
    return f"torch {torch.__version__}, CUDA {torch.version.cuda}: no device"


def gpu_index(local_rank: int, device_count: int, ranks_on_node: int | None) -> int:
    """The CUDA device index of the ``local_rank``-th rank on a node that sees ``device_count``
    GPUs. Each rank sees every GPU of the node (index = local rank), or only its own one (Slurm's
    per-task binding: index 0; :func:`check_own_gpus` confirms they differ). Anything else would
    put two ranks on one GPU: a :class:`GpuError`."""
    if device_count <= 0:
        raise GpuError("CUDA is available but sees no GPU")
    if local_rank < device_count and (ranks_on_node is None or ranks_on_node <= device_count):
        return local_rank
    if device_count == 1:
        return 0
    raise GpuError(
        f"local rank {local_rank} of {ranks_on_node or '?'} ranks on this node sees only "
        f"{device_count} GPUs: ranks would share a GPU. Start one rank per GPU "
        "(train.gpus_per_node = the node's GPUs; srun --ntasks-per-node equal to --gpus-per-node)")


def check_own_gpus(placement: list[tuple[int, str, str]]) -> None:
    """Every rank on its own GPU: ``placement`` is (rank, host, GPU UUID) of every rank; two
    ranks on one GPU would halve its speed and can run it out of memory."""
    seen: dict[tuple[str, str], int] = {}
    for rank, host, uuid in placement:
        other = seen.setdefault((host, uuid), rank)
        if other != rank:
            raise GpuError(
                f"ranks {other} and {rank} both run on GPU {uuid} of {host}: each rank needs a "
                "GPU of its own. Check that the job asks for as many GPUs per node as tasks per "
                "node (train.gpus_per_node) and that the site's srun binds one GPU per task, or "
                "none (then each rank uses the GPU of its local rank)")


def setup(job: JobEnvironment, rendezvous_dir: Path | None = None) -> DistEnv:
    """Join the job's process group and pick this rank's device.

    NCCL with this rank's own GPU (the group is bound to it: ``device_id``), gloo on CPU. Under
    srun without ``MASTER_PORT``, rank 0 opens the rendezvous store on a port the system gives it
    (it cannot collide with another job's) and tells the others through a file in
    ``rendezvous_dir`` (the run folder, which every node sees); with ``MASTER_PORT`` (torchrun,
    or set by hand) that port is used.
    """
    rank, local_rank, world = ranks(job)
    device = pick_device(job)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    env = DistEnv(rank, local_rank, world, device, None)
    if world > 1:
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        if job.vars.get("MASTER_PORT") or rendezvous_dir is None:
            addr, port = job.master_addr, job.master_port
            # env:// reads these two; setting them is also what torchrun would have done.
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
            log.info("rank %d/%d joins %s process group at %s:%d on %s", rank, world, backend,
                     addr, port, device)
            dist.init_process_group(backend, init_method="env://", rank=rank,
                                    world_size=world, timeout=JOIN_TIMEOUT, **kwargs)
        else:
            store = _rendezvous_store(job, rank, world, rendezvous_dir)
            log.info("rank %d/%d joins %s process group at %s:%d on %s", rank, world, backend,
                     store.host, store.port, device)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=JOIN_TIMEOUT, **kwargs)
            if rank == 0:  # every rank has joined, so has read it
                rendezvous_file(job, rendezvous_dir).unlink(missing_ok=True)
        env.backend = backend
        if device.type == "cuda":
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            check_own_gpus(all_gather_object(env, (rank, socket.gethostname(), uuid)))
    return env


def rendezvous_file(job: JobEnvironment, folder: Path) -> Path:
    """Where rank 0 writes the store's address: one name per job start (a requeued start has
    its own restart count), so a file of an earlier start is never read."""
    return Path(folder) / f".rendezvous-{job.job_id or 'local'}-{job.restart_count}.json"


def _rendezvous_store(job: JobEnvironment, rank: int, world: int, folder: Path) -> Any:
    """Rank 0: a TCPStore on a free port, its address written to :func:`rendezvous_file`;
    the others: connect to the address read from it."""
    path = rendezvous_file(job, folder)
    host = job.master_addr
    if rank == 0:
        store = dist.TCPStore(host, 0, world, is_master=True, timeout=JOIN_TIMEOUT,
                              wait_for_workers=False)
        write_json(path, {"host": host, "port": store.port})
        return store
    deadline = time.monotonic() + JOIN_TIMEOUT.total_seconds()
    while True:
        try:
            where = json.loads(path.read_text())
            break
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise HpcpipeError(f"rank {rank}: rank 0 did not open the rendezvous ({path} "
                               f"missing after {JOIN_TIMEOUT}); see rank 0's log") from None
            time.sleep(0.2)
    return dist.TCPStore(where["host"], int(where["port"]), world, is_master=False,
                         timeout=JOIN_TIMEOUT)


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
