"""Jobs on a Slurm cluster: ``sbatch --parsable`` chained with ``afterok`` dependencies."""

from __future__ import annotations

from pathlib import Path

from hpcpipe.config import RunConfig, train_nodes
from hpcpipe.errors import ConfigError, SchedulerError
from hpcpipe.scheduler import slurm as scheduler
from hpcpipe.scheduler.base import Backend, JobInfo


class SlurmBackend(Backend):
    name = "slurm"

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
        """Refuse a layout the partition cannot place, using one ``sinfo`` call; only the steps
        in ``cfg.steps`` (a rerun passes the steps it is about to queue)."""
        nodes, default = scheduler.nodes()
        part = cfg.slurm.partition or default
        if part is None:
            raise ConfigError("no partition given and the cluster has no default partition; "
                              "pass --partition")
        in_part = [n for n in nodes if part in n.partitions]
        if not in_part:
            known = sorted({p for n in nodes for p in n.partitions})
            raise ConfigError(f"partition '{part}' does not exist on this cluster; "
                              f"known partitions: {', '.join(known)}")
        for step in ("ingest", "features", "train"):
            mem = getattr(cfg, step).mem
            if step in cfg.steps and mem:
                _check_memory(step, mem, in_part, part)
        if "ingest" in cfg.steps:
            fit = [n for n in in_part if n.cpus >= cfg.ingest.cpus]
            if not fit:
                raise ConfigError(
                    f"ingest asks for {cfg.ingest.cpus} CPUs on one node but partition '{part}' "
                    f"has no node with that many (largest: {max(n.cpus for n in in_part)}); "
                    "lower ingest.cpus")
        if "features" in cfg.steps:
            f = cfg.features
            per_node = -(-f.cpus // f.nodes)
            fit = [n for n in in_part if n.cpus >= per_node]
            if len(fit) < f.nodes:
                raise ConfigError(
                    f"features asks for {f.cpus} CPUs on {f.nodes} node(s) ({per_node} per node) "
                    f"but partition '{part}' has {len(fit)} node(s) with that many CPUs "
                    f"(largest: {max(n.cpus for n in in_part)}); lower --cpus or raise "
                    "features.nodes")
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


def _mem_mb(text: str) -> int:
    """An ``--mem`` value (checked by the config: digits and an optional K/M/G/T) in MB, the unit
    sinfo reports node memory in and sbatch assumes without a suffix."""
    unit = text[-1].upper() if text[-1].isalpha() else "M"
    number = int(text[:-1] if text[-1].isalpha() else text)
    return {"K": number // 1024, "M": number, "G": number * 1024, "T": number * 1024 ** 2}[unit]


def _check_memory(step: str, mem: str, in_part: list[scheduler.NodeInfo], part: str) -> None:
    """sbatch refuses a ``--mem`` no node of the partition has ("Memory specification can not be
    satisfied"): say so before anything is queued."""
    largest = max(n.memory_mb for n in in_part)
    if _mem_mb(mem) > largest:
        raise ConfigError(
            f"{step}.mem={mem} is more memory than any node of partition '{part}' has (largest: "
            f"{largest} MB, about {largest / 1024:.1f}G); lower {step}.mem, e.g. "
            f"--set {step}.mem={largest}M")
