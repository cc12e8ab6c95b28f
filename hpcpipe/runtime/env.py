"""Where a job is: the one place that reads the allocation's environment.

Inside a Slurm job the answers come from ``SLURM_*`` variables (and torchrun's ``RANK``/
``LOCAL_RANK``/``WORLD_SIZE``, which win where set); under the local runner from
``HPCPIPE_JOB_ID``; elsewhere a single process on this machine. :class:`JobEnvironment` is built
once at the job's entry (:mod:`hpcpipe.runtime.entry`) from a plain mapping and handed to the
step, so every answer can be tested with a dict. No other module reads ``SLURM_*``.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Rendezvous ports are derived from the job id within this range, so two jobs sharing a node
#: (each with its own id) do not collide.
PORT_BASE, PORT_SPAN = 15000, 20000

#: Set to 1 to let the train step train on CPU in an allocation with GPUs that CUDA cannot use;
#: without it that is an error (a GPU job on CPU would hold its GPUs for nothing).
ALLOW_CPU_ON_GPU_ALLOCATION = "HPCPIPE_ALLOW_CPU_ON_GPU_ALLOCATION"


def _int(value: str | None) -> int | None:
    """The leading whole number of a variable: "32" and "32(x2)" both give 32; junk gives None."""
    m = re.match(r"^\s*(\d+)", value or "")
    return int(m.group(1)) if m else None


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list in Python, as ``scontrol show hostnames`` prints it.

    ``n[1-2],gpu[01-03,07]`` gives n1 n2 gpu01 gpu02 gpu03 gpu07; zero padding is kept and
    several bracket groups in one name multiply (``r[1-2]n[1-2]``: r1n1 r1n2 r2n1 r2n2).
    """
    hosts: list[str] = []
    for name in _split_top_level(text.strip()):
        hosts += _expand_one(name)
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += {"[": 1, "]": -1}.get(ch, 0)
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _expand_one(name: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if not m:
        return [name]
    head, tail = name[: m.start()], name[m.end():]
    out = []
    for item in m.group(1).split(","):
        lo, _, hi = item.partition("-")
        if not hi:
            values = [lo]
        else:
            width = len(lo) if lo.startswith("0") else 0
            values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        for v in values:
            out += _expand_one(f"{head}{v}{tail}")
    return out


def _tasks_per_node(text: str) -> list[int]:
    """``2(x3),1`` as [2, 2, 2, 1]; [] if the text is not in that form."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        m = re.match(r"^(\d+)(?:\(x(\d+)\))?$", part.strip())
        if not m:
            return []
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


@dataclass(frozen=True)
class JobEnvironment:
    """Answers to "where am I?" inside a job, read from one mapping of environment variables."""

    vars: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> JobEnvironment:
        return cls(dict(os.environ if environ is None else environ))

    def _get(self, name: str) -> str:
        return self.vars.get(name, "")

    # -- the job -------------------------------------------------------------------------------

    @property
    def in_slurm(self) -> bool:
        """True inside a Slurm allocation."""
        return bool(self._get("SLURM_JOB_ID"))

    @property
    def job_id(self) -> str | None:
        """The Slurm job id, or the local runner's (``L<pid>``); None outside both."""
        return self._get("SLURM_JOB_ID") or self._get("HPCPIPE_JOB_ID") or None

    @property
    def restart_count(self) -> int:
        """How often Slurm requeued this job before this start."""
        return _int(self._get("SLURM_RESTART_COUNT")) or 0

    # -- ranks ---------------------------------------------------------------------------------

    @property
    def _torchrun(self) -> bool:
        return _int(self._get("WORLD_SIZE")) is not None and _int(self._get("RANK")) is not None

    @property
    def ntasks(self) -> int:
        """Tasks of the job step (srun's world); 1 outside srun."""
        return _int(self._get("SLURM_NTASKS")) or 1

    @property
    def task_rank(self) -> int:
        """This process's Slurm task id (``SLURM_PROCID``); 0 outside srun."""
        return _int(self._get("SLURM_PROCID")) or 0

    @property
    def under_srun(self) -> bool:
        """True when this process is one task of several started by srun."""
        return self.ntasks > 1 and _int(self._get("SLURM_PROCID")) is not None

    @property
    def global_rank(self) -> int:
        if self._torchrun:
            return _int(self._get("RANK")) or 0
        return self.task_rank if self.under_srun else 0

    @property
    def local_rank(self) -> int:
        if self._torchrun:
            return _int(self._get("LOCAL_RANK")) or 0
        return (_int(self._get("SLURM_LOCALID")) or 0) if self.under_srun else 0

    @property
    def world_size(self) -> int:
        if self._torchrun:
            return _int(self._get("WORLD_SIZE")) or 1
        return self.ntasks if self.under_srun else 1

    # -- nodes and resources -------------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        return (_int(self._get("SLURM_JOB_NUM_NODES")) or 1) if self.in_slurm else 1

    @property
    def node_id(self) -> int:
        """Index of this node in the allocation (``SLURM_NODEID``)."""
        return _int(self._get("SLURM_NODEID")) or 0

    @property
    def nodelist(self) -> str:
        return self._get("SLURM_JOB_NODELIST") or self._get("SLURM_NODELIST")

    @property
    def hostnames(self) -> list[str]:
        """The allocation's nodes, expanded in Python (no ``scontrol`` needed in a container)."""
        return expand_hostlist(self.nodelist) if self.nodelist else []

    @property
    def tasks_per_node(self) -> list[int]:
        """Tasks on each node of the step (``2(x3),1`` -> [2, 2, 2, 1]); [] where unknown."""
        return _tasks_per_node(self._get("SLURM_STEP_TASKS_PER_NODE")
                               or self._get("SLURM_TASKS_PER_NODE"))

    @property
    def cpus_per_task(self) -> int | None:
        return _int(self._get("SLURM_CPUS_PER_TASK"))

    @property
    def cpus_on_node(self) -> int | None:
        return _int(self._get("SLURM_CPUS_ON_NODE"))

    def memory_bytes(self, cpus: int) -> int | None:
        """The allocation's memory on this node (``--mem`` or ``--mem-per-cpu`` x ``cpus``)."""
        per_node = _int(self._get("SLURM_MEM_PER_NODE"))
        if per_node:
            return per_node * 2**20
        per_cpu = _int(self._get("SLURM_MEM_PER_CPU"))
        return per_cpu * cpus * 2**20 if per_cpu else None

    # -- rendezvous ----------------------------------------------------------------------------

    @property
    def master_addr(self) -> str:
        """``MASTER_ADDR``, else the address of the allocation's first node, else loopback."""
        if self._get("MASTER_ADDR"):
            return self._get("MASTER_ADDR")
        hosts = self.hostnames
        if not hosts:
            return "127.0.0.1"
        try:
            return socket.gethostbyname(hosts[0])
        except OSError:
            return hosts[0]  # let the process group try the name; its error names the host

    @property
    def master_port(self) -> int:
        """``MASTER_PORT``, else one derived from the job id so concurrent jobs on a node differ."""
        port = _int(self._get("MASTER_PORT"))
        if port:
            return port
        return PORT_BASE + (_int(self._get("SLURM_JOB_ID")) or 0) % PORT_SPAN

    # -- GPUs ----------------------------------------------------------------------------------

    @property
    def allocated_gpus(self) -> list[str]:
        """The GPUs the allocation gives this process, as it names them: ``CUDA_VISIBLE_DEVICES``
        (set by Slurm's gres plugin, or by hand), else ``SLURM_STEP_GPUS``/``SLURM_JOB_GPUS``,
        else ``SLURM_GPUS_ON_NODE`` (a count); [] where none is (Slurm writes ``NoDevFiles``)."""
        for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
            value = self._get(name).strip()
            if value:
                ids = [v.strip() for v in value.split(",") if v.strip()]
                return [] if ids in (["NoDevFiles"], ["-1"]) else ids
        count = _int(self._get("SLURM_GPUS_ON_NODE")) or 0
        return [str(i) for i in range(count)]

    @property
    def cpu_on_gpu_allocation_allowed(self) -> bool:
        """``HPCPIPE_ALLOW_CPU_ON_GPU_ALLOCATION=1``: train on CPU even where the allocation
        has GPUs that CUDA cannot use (a test cluster whose GPUs are declared, not real)."""
        return self._get(ALLOW_CPU_ON_GPU_ALLOCATION).strip().lower() in ("1", "true", "yes")

    @property
    def node_gpus(self) -> str:
        """The GPUs of the job on this node as NVML numbers them (``SLURM_STEP_GPUS`` or
        ``SLURM_JOB_GPUS``; a rank's ``CUDA_VISIBLE_DEVICES`` may show only its own); "" where
        unknown (then every GPU the node has)."""
        return (self._get("SLURM_STEP_GPUS") or self._get("SLURM_JOB_GPUS")
                or self._get("CUDA_VISIBLE_DEVICES"))
