"""The Dask cluster of a step (features, ingest), sized from the allocation it runs in.

The allocation is read only through :class:`~hpcpipe.runtime.env.JobEnvironment`, which the
step passes in. One node (or no Slurm at all): a ``distributed.LocalCluster`` of worker processes.
Several nodes (the step launched with ``srun``, one task per Dask process):
``dask_jobqueue.slurm.SLURMRunner``, where Slurm rank 0 runs the scheduler, rank 1 the client code
and the other ranks one worker each.

Worker counts follow the allocation (CPUs per task inside Slurm, ``os.cpu_count()`` outside) but
never exceed the CPUs this process may actually run on (``os.sched_getaffinity``): a node that
declares more CPUs than it has would otherwise get more workers than cores.

dask and distributed are imported inside the functions that need them so that importing this
module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hpcpipe.errors import ConfigError
from hpcpipe.runtime.env import JobEnvironment

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)


class ClusterSettings(Protocol):
    """What sizes a cluster: a step's config (``FeaturesConfig``, ``IngestConfig``)."""

    @property
    def threads_per_worker(self) -> int: ...

    @property
    def worker_memory(self) -> str: ...

#: Share of a node's memory given to the workers when ``worker_memory`` is "auto"; the rest is
#: left to the scheduler, the client and the operating system.
AUTO_MEMORY_SHARE = 0.9

# Loggers that chatter at INFO on every worker start and stop.
_NOISY_LOGGERS = ("distributed", "dask_jobqueue", "tornado", "bokeh")


@dataclass(frozen=True)
class WorkerPlan:
    """How many Dask workers to start, decided from the allocation and the usable CPUs."""

    nodes: int
    cpus_allocated: int  # per node
    cpus_usable: int  # per node, from the CPU affinity of this process
    workers_per_node: int
    threads_per_worker: int
    memory_per_worker: int  # bytes; 0 = no limit
    per_task_binding: bool = False  # several nodes: Slurm binds each task to its own CPUs

    @property
    def n_workers(self) -> int:
        """Workers over all nodes (under SLURMRunner see ``slurm_roles``, which counts exactly)."""
        return self.nodes * self.workers_per_node

    def describe(self, n_workers: int | None = None) -> str:
        """The decision in words, e.g. "32 CPUs allocated, 2 usable: 2 workers x 1 thread"."""
        n = self.n_workers if n_workers is None else n_workers
        nodes = f"{self.nodes} nodes x " if self.nodes > 1 else ""
        per = (" per task" if self.per_task_binding else " per node") if self.nodes > 1 else ""
        workers = "worker" if n == 1 else "workers"
        threads = "thread" if self.threads_per_worker == 1 else "threads"
        mem = f", {self.memory_per_worker / 2**30:.1f} GiB each" if self.memory_per_worker else ""
        return (
            f"{nodes}{self.cpus_allocated} CPUs allocated, {self.cpus_usable} usable{per}: "
            f"{n} {workers} x {self.threads_per_worker} {threads}{mem}"
        )


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), which Slurm and cgroups may narrow."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _node_memory(env: JobEnvironment, cpus_allocated: int) -> int:
    """Bytes of memory this node's share of the allocation may use (the machine's outside Slurm)."""
    machine = _machine_memory()
    slurm = env.memory_bytes(cpus_allocated)
    if slurm:
        return min(slurm, machine) if machine else slurm
    return machine


def _parse_memory(text: str, key: str = "features.worker_memory") -> int:
    from dask.utils import parse_bytes

    try:
        value = int(parse_bytes(text))
    except (ValueError, TypeError):
        raise ConfigError(
            f"{key}: {text!r} is not a memory size such as 4GB or 500MiB, nor 'auto'"
        ) from None
    if value <= 0:
        raise ConfigError(f"{key}: {text!r} must be a positive memory size")
    return value


def plan_workers(cfg: ClusterSettings, env: JobEnvironment, step: str = "features"
                 ) -> WorkerPlan:
    """Decide workers per node, threads per worker and memory per worker for the allocation ``env``.

    One node: the allocation is the CPUs per task (or the CPUs on the node) inside Slurm,
    ``os.cpu_count()`` outside, split into workers of ``cfg.threads_per_worker`` threads.
    Several nodes (under srun): every task is one worker of its CPUs-per-task threads.
    Either way no node gets more worker threads than the CPUs in this process's affinity mask:
    when Slurm binds each task to its own CPUs the mask is the task's share; when it does not
    (the mask is the whole machine) the mask is shared by the node's tasks and caps their sum.
    """
    usable = usable_cpus()
    nodes = env.num_nodes
    tasks = env.tasks_per_node if nodes > 1 else []
    per_task_binding = False
    if nodes > 1:
        per_task = env.cpus_per_task or 1
        allocated = per_task * (max(tasks) if tasks else 1)
        threads = max(1, min(per_task, usable))
        # A mask smaller than the machine means Slurm bound this task to its own CPUs.
        per_task_binding = usable < (os.cpu_count() or usable)
        workers = max(tasks) if per_task_binding and tasks else max(1, usable // threads)
        if tasks:  # a node cannot run more workers than it has tasks
            workers = max(1, min(workers, max(tasks)))
    else:
        if env.in_slurm:
            allocated = env.cpus_per_task or env.cpus_on_node or os.cpu_count() or 1
        else:
            allocated = os.cpu_count() or 1
        cpus = max(1, min(allocated, usable))
        threads = max(1, min(cfg.threads_per_worker, cpus))
        workers = max(1, cpus // threads)
    if cfg.worker_memory.strip().lower() == "auto":
        node_mem = _node_memory(env, allocated)
        memory = int(node_mem * AUTO_MEMORY_SHARE / workers) if node_mem else 0
    else:
        memory = _parse_memory(cfg.worker_memory, f"{step}.worker_memory")
    return WorkerPlan(nodes=nodes, cpus_allocated=allocated, cpus_usable=usable,
                      workers_per_node=workers, threads_per_worker=threads,
                      memory_per_worker=memory, per_task_binding=per_task_binding)


def _quiet_dask_logs() -> None:
    """Keep Dask's per-worker chatter out of the step's log (after distributed's own logging
    setup, which its import runs)."""
    # Worker processes configure their logging when they import distributed: tell them by the
    # environment they inherit (a user's own setting wins).
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    import distributed  # noqa: F401

    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def _worker_environ() -> Iterator[None]:
    """Dask's environment for worker processes, without its ``MALLOC_TRIM_THRESHOLD_``.

    Setting that variable at all turns off glibc's adaptive mmap threshold: every allocation over
    128 KiB is then mapped and zeroed anew by the kernel. Ingest allocates a 16 MB block after
    another; with the variable its workers spent a fifth of their time in the kernel (measured on
    one 4M-review file, two workers). glibc's default still returns freed memory, later."""
    import dask

    key = "distributed.nanny.pre-spawn-environ"
    environ = {k: v for k, v in (dask.config.get(key, default=None) or {}).items()
               if k != "MALLOC_TRIM_THRESHOLD_"}
    with dask.config.set({key: environ}):
        yield


@contextlib.contextmanager
def open_cluster(
    cfg: ClusterSettings, scheduler_file: Path | None = None, env: JobEnvironment | None = None,
    step: str = "features",
) -> Iterator[Client | None]:
    """Start the Dask cluster for this allocation and yield a connected ``distributed.Client``.

    On one node the cluster is a ``LocalCluster`` of worker processes, closed on exit.

    On several nodes (every Slurm task runs this same code under ``srun``) the cluster is a
    ``dask_jobqueue.slurm.SLURMRunner``: only Slurm rank 1 gets a client and runs the body of the
    ``with``; the scheduler (rank 0) and worker ranks serve until the client leaves the ``with``,
    then get ``None`` here once the cluster has shut down, and the caller must simply return.
    Worker ranks beyond the usable CPUs of their node get ``None`` at once. ``scheduler_file`` (on
    a file system every node sees) is where the scheduler publishes its address; "{job_id}" in
    it is replaced by the Slurm job id. ``env`` is the job's environment (read from
    ``os.environ`` when not given).
    """
    if env is None:
        env = JobEnvironment.from_environ()
    plan = plan_workers(cfg, env, step)
    _quiet_dask_logs()
    if plan.nodes > 1:
        with _worker_environ(), _slurm_runner_client(plan, scheduler_file, env, step) as client:
            yield client
        return

    from distributed import Client, LocalCluster

    log.info("%s", plan.describe())
    with _worker_environ(), LocalCluster(
        n_workers=plan.workers_per_node,
        threads_per_worker=plan.threads_per_worker,
        processes=True,
        memory_limit=plan.memory_per_worker or None,
        dashboard_address=":0",  # a free port: several clusters may share a machine
        silence_logs=logging.WARNING,
    ) as cluster, Client(cluster) as client:
        client.wait_for_workers(plan.workers_per_node, timeout=120)
        yield client


# ---------------------------------------------------------------------------------------------
# Several nodes: dask_jobqueue's SLURMRunner.


@dataclass(frozen=True)
class SlurmRoles:
    """Which Slurm ranks serve as active workers (the others beyond a node's usable CPUs idle)."""

    rank: int
    active: bool  # this rank starts its role (scheduler, client, or a worker within the CPU cap)
    n_workers: int  # active workers over all nodes, what the client waits for


def slurm_roles(plan: WorkerPlan, env: JobEnvironment) -> SlurmRoles:
    """Roles under srun with block task distribution: rank 0 scheduler, rank 1 client, then workers.

    Each node runs at most ``plan.workers_per_node`` workers; ranks beyond that on their node idle.
    """
    rank = env.task_rank
    local = env.local_rank
    node = env.node_id
    tasks = env.tasks_per_node or [env.ntasks]
    # Block distribution: rank r lives on the first node whose cumulative task count exceeds r.
    starts = [sum(tasks[:i]) for i in range(len(tasks))]

    def node_of(r: int) -> int:
        return max(i for i, s in enumerate(starts) if s <= r)

    service = [node_of(r) for r in (0, 1) if r < sum(tasks)]  # scheduler and client ranks
    n_workers = sum(min(t - service.count(i), plan.workers_per_node) for i, t in enumerate(tasks))
    if rank < 2:
        return SlurmRoles(rank=rank, active=True, n_workers=n_workers)
    # Ranks 0 and 1 come first on their node, so a worker's index on its node skips them.
    worker_index = local - service.count(node)
    return SlurmRoles(rank=rank, active=worker_index < plan.workers_per_node, n_workers=n_workers)


@contextlib.contextmanager
def _slurm_runner_client(plan: WorkerPlan, scheduler_file: Path | None,
                         env: JobEnvironment, step: str = "features") -> Iterator[Client | None]:
    world = env.ntasks
    if not env.under_srun or world < 3:
        raise ConfigError(
            f"the {step} step on {plan.nodes} nodes runs one Dask process per Slurm task and "
            f"needs at least 3 tasks (scheduler, client, a worker), found {world}: launch it with "
            "`srun` in an allocation of `--nodes=N --ntasks-per-node=2` or more tasks per node "
            "(see hpcpipe/steps/features.py)"
        )
    roles = slurm_roles(plan, env)
    if not roles.active:
        log.info("rank %d idle: its node already runs %d workers on %d usable CPUs", roles.rank,
                 plan.workers_per_node, plan.cpus_usable)
        yield None
        return
    if roles.rank == 1:
        # jobmain logs only warnings on ranks other than 0; the client rank is the one to watch.
        logging.getLogger("hpcpipe").setLevel(logging.INFO)
        log.info("%s (scheduler on rank 0, client on rank 1, workers on ranks 2+)",
                 plan.describe(roles.n_workers))

    # Importing the runner installs a SIGINT handler (sys.exit) for its shutdown: import it here.
    from dask_jobqueue.slurm import SLURMRunner
    from distributed import Client

    path = str(scheduler_file) if scheduler_file else "scheduler-{job_id}.json"
    worker_options = {"nthreads": plan.threads_per_worker,
                      "memory_limit": plan.memory_per_worker or None}
    try:
        runner = SLURMRunner(scheduler_file=path,
                             scheduler_options={"dashboard_address": ":0"},
                             worker_options=worker_options)
    except SystemExit:
        # Scheduler and worker ranks block in the constructor while the cluster runs and leave
        # with SystemExit when it shuts down: their part is done.
        yield None
        return
    with runner, Client(runner) as client:
        try:
            client.wait_for_workers(roles.n_workers, timeout=300)
        except TimeoutError:
            have = len(client.scheduler_info()["workers"])
            log.warning("only %d of %d Dask workers joined within 300 s; going on with them",
                        have, roles.n_workers)
            client.wait_for_workers(1, timeout=300)
        yield client
