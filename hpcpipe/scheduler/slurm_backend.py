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
        """Refuse a layout the partition cannot place, using one ``sinfo`` call."""
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
