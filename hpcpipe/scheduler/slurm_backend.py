"""Jobs on a Slurm cluster: ``sbatch --parsable`` chained with ``afterok`` dependencies."""

from __future__ import annotations

from pathlib import Path

from hpcpipe.config import RunConfig, time_limit_seconds, train_nodes
from hpcpipe.errors import ConfigError, SchedulerError
from hpcpipe.scheduler import site
from hpcpipe.scheduler import slurm as scheduler
from hpcpipe.scheduler.base import Backend, JobInfo


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self, facts: site.SiteFacts | None = None) -> None:
        #: What the site takes (GPU request form, --mem-per-gpu), set by :meth:`check` from the
        #: cached facts; the scripts are rendered from them. None: not known, render the forms
        #: every Slurm takes (--gres, --mem).
        self.facts = facts

    def launcher(self, step: str, ntasks: int) -> str:
        # srun starts one task per rank; a failing rank ends the whole step. Since Slurm 22.05
        # srun no longer takes --cpus-per-task over from sbatch: pass it on explicitly.
        if ntasks > 1 or step == "train":
            return 'srun --kill-on-bad-exit=1 --label --cpus-per-task="$SLURM_CPUS_PER_TASK"'
        return ""

    def _dependency_args(self, depends_on: list[str]) -> list[str]:
        if not depends_on:
            return []
        return [f"--dependency=afterok:{':'.join(depends_on)}", "--kill-on-invalid-dep=yes"]

    def submit_command(self, script: Path, depends_on: list[str]) -> list[str]:
        return ["sbatch", "--parsable", *self._dependency_args(depends_on), str(script)]

    def submit(self, script: Path, depends_on: list[str]) -> str:
        return scheduler.sbatch(str(script), self._dependency_args(depends_on))

    def query(self, job_ids: list[str]) -> dict[str, JobInfo]:
        return scheduler.query(job_ids)

    def cancel(self, job_ids: list[str]) -> None:
        scheduler.scancel(job_ids)

    def find(self, job_name: str, script: Path) -> list[str]:
        return scheduler.jobs_named(job_name)

    def accounting(self, job_ids: list[str]) -> dict[str, JobInfo]:
        try:
            return scheduler.sacct(job_ids)
        except SchedulerError:  # accounting off or slurmdbd down: no figures, not an error
            return {}

    def check(self, cfg: RunConfig) -> None:
        """Refuse a layout the partition cannot place; only the steps in ``cfg.steps`` (a rerun
        passes the steps it is about to queue). Reads the site's facts (``scontrol show config``
        and the layout's ``sinfo``; the cached rest, probed once where there is no cache) and
        keeps them for rendering the scripts."""
        self.facts = site.for_layout_check()
        nodes = self.facts.nodes
        default = next((p.name for p in self.facts.partitions if p.default), None)
        part = cfg.slurm.partition or default
        if part is None:
            raise ConfigError("no partition given and the cluster has no default partition; "
                              "pass --partition")
        in_part = [n for n in nodes if part in n.partitions]
        if not in_part:
            known = sorted({p for n in nodes for p in n.partitions})
            raise ConfigError(f"partition '{part}' does not exist on this cluster; "
                              f"known partitions: {', '.join(known)}")
        for step in ("ingest", "features"):
            if step in cfg.steps:
                _check_dask_nodes(cfg, step, in_part, part)
        if "train" in cfg.steps:
            t = cfg.train
            n_nodes, per_node = train_nodes(t)
            cpus = per_node * t.cpus_per_gpu
            fit = [n for n in in_part if n.gpus >= per_node and n.cpus >= cpus]
            if len(fit) < n_nodes:
                most = max(n.gpus for n in in_part)
                raise ConfigError(
                    f"train asks for {t.gpus} GPU(s) as {n_nodes} node(s) x {per_node} GPU(s) "
                    f"(and {cpus} CPUs per node), but partition '{part}' has only {len(fit)} "
                    f"node(s) that can hold that (most GPUs on one node: {most}); "
                    "change --gpus/--gpus-per-node or the partition")
        # CPUs and GPUs first (the shape the user asked for), then memory and the partition's
        # limits, so the first refusal names the option the user most likely got wrong.
        limits = self.facts.partition(part)
        for step in ("ingest", "features", "train"):
            if step in cfg.steps:
                _check_memory(cfg, step, in_part, part, self.facts)
                if limits is not None:
                    _check_partition_limits(cfg, step, limits)


def _check_dask_nodes(cfg: RunConfig, step: str, in_part: list[scheduler.NodeInfo],
                      part: str) -> None:
    """A Dask step (ingest, features) needs ``nodes`` nodes of ``ceil(cpus / nodes)`` CPUs."""
    nodes, per_node, _ = step_nodes(cfg, step)
    fit = [n for n in in_part if n.cpus >= per_node]
    if len(fit) >= nodes:
        return
    largest = max(n.cpus for n in in_part)
    cpus_key = "--cpus" if step == "features" else "ingest.cpus"
    fix = (f"lower {cpus_key} or raise {step}.nodes" if not fit
           else f"lower {step}.nodes or {cpus_key}")
    raise ConfigError(
        f"{step} asks for {getattr(cfg, step).cpus} CPUs on {nodes} node(s) ({per_node} per "
        f"node) but partition '{part}' has {len(fit)} node(s) with that many CPUs (largest: "
        f"{largest}); {fix}")


def _mem_mb(text: str) -> int:
    """An ``--mem`` value (checked by the config: digits and an optional K/M/G/T) in MB, the unit
    sinfo reports node memory in and sbatch assumes without a suffix."""
    unit = text[-1].upper() if text[-1].isalpha() else "M"
    number = int(text[:-1] if text[-1].isalpha() else text)
    return {"K": number // 1024, "M": number, "G": number * 1024, "T": number * 1024 ** 2}[unit]


def step_nodes(cfg: RunConfig, step: str) -> tuple[int, int, int]:
    """(nodes, CPUs per node, GPUs per node) that ``step`` asks for."""
    if step in ("ingest", "features"):
        d = cfg.ingest if step == "ingest" else cfg.features
        return d.nodes, -(-d.cpus // d.nodes), 0
    n, per_node = train_nodes(cfg.train)
    return n, per_node * cfg.train.cpus_per_gpu, per_node


def memory_per_node_mb(cfg: RunConfig, step: str) -> tuple[int, str] | None:
    """The memory a step asks for on each node, in MB, and the key that sets it; None where
    it asks for none (the partition's default)."""
    sc = getattr(cfg, step)
    _, cpus, gpus = step_nodes(cfg, step)
    if sc.mem:
        return _mem_mb(sc.mem), f"{step}.mem={sc.mem}"
    if getattr(sc, "mem_per_cpu", None):
        return _mem_mb(sc.mem_per_cpu) * cpus, f"{step}.mem_per_cpu={sc.mem_per_cpu} x {cpus} CPUs"
    if getattr(sc, "mem_per_gpu", None):
        return _mem_mb(sc.mem_per_gpu) * gpus, f"{step}.mem_per_gpu={sc.mem_per_gpu} x {gpus} GPUs"
    return None


def _check_memory(cfg: RunConfig, step: str, in_part: list[scheduler.NodeInfo], part: str,
                  facts: site.SiteFacts | None) -> None:
    """sbatch refuses memory no node of the partition has ("Memory specification can not be
    satisfied"): say so before anything is queued, naming the key."""
    asked = memory_per_node_mb(cfg, step)
    if asked is None:
        return
    mb, what = asked
    largest = max(n.memory_mb for n in in_part)
    if mb <= largest:
        return
    sc = getattr(cfg, step)
    if sc.mem:
        fix = f"lower {step}.mem, e.g. --set {step}.mem={largest}M"
    else:
        key = "mem_per_cpu" if getattr(sc, "mem_per_cpu", None) else "mem_per_gpu"
        _, cpus, gpus = step_nodes(cfg, step)
        per = largest // (cpus if key == "mem_per_cpu" else gpus)
        fix = f"lower {step}.{key}, e.g. --set {step}.{key}={per}M"
    raise ConfigError(
        f"{what} is more memory than any node of partition '{part}' has (largest: "
        f"{largest} MB, about {largest / 1024:.1f}G); {fix}")


def _check_partition_limits(cfg: RunConfig, step: str, p: site.Partition) -> None:
    """A time above the partition's MaxTime or more nodes than its MaxNodes pend forever
    (PartitionTimeLimit, PartitionNodeLimit): refuse them before anything is queued."""
    sc = getattr(cfg, step)
    limit = p.max_time_s
    if limit is not None and time_limit_seconds(sc.time) > limit:
        raise ConfigError(
            f"{step}.time {sc.time} is above partition {p.name}'s MaxTime {p.max_time}; "
            f"lower {step}.time or pass --partition")
    nodes, _, _ = step_nodes(cfg, step)
    if p.max_nodes is not None and nodes > p.max_nodes:
        key = "--gpus or --gpus-per-node" if step == "train" else f"{step}.nodes"
        raise ConfigError(
            f"{step} asks for {nodes} nodes, above partition {p.name}'s MaxNodes {p.max_nodes}; "
            f"change {key} or pass --partition")
