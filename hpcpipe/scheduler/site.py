"""What this Slurm site is, and what hpcpipe does differently because of it.

The facts (version, accounting, select plugin and the GPU request form it takes, nodes and
partitions, array size, log appending, preemption, and optionally what a compute node sees) are
probed once and cached per cluster (``ClusterName``) under ``$XDG_CACHE_HOME/hpcpipe/``.
``hpcpipe doctor`` probes afresh and prints each fact with its consequence; the layout check of
submit and rerun (:meth:`SlurmBackend.check`) reads the cache, probing once where there is none
or where ``scontrol show config`` no longer matches it (an upgrade, a new select plugin).

Every scheduler call goes through :mod:`hpcpipe.scheduler.slurm`. Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcpipe import files
from hpcpipe.config import time_limit_seconds
from hpcpipe.scheduler import slurm
from hpcpipe.scheduler.slurm import NodeInfo

#: Bumped when the cached layout changes; an older cache is probed again.
FACTS_VERSION = 1
#: The versions hpcpipe's tests run on (tests/slurm/VERSIONS.md).
TESTED_VERSIONS = ("22.05", "25.11")
_VERSION_RE = re.compile(r"^SLURM_VERSION\s*=\s*(\S+)", re.M)


@dataclass
class Partition:
    name: str
    default: bool
    #: As scontrol prints it: ``UNLIMITED``, ``00:10:00``, ``1-00:00:00``.
    max_time: str
    #: None: no limit.
    max_nodes: int | None
    preempt_mode: str = ""

    @property
    def max_time_s(self) -> int | None:
        if self.max_time.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
            return None
        try:
            return time_limit_seconds(self.max_time)
        except ValueError:
            return None


@dataclass
class ComputeNode:
    """What the probe job saw on a compute node."""

    node: str = ""
    python: str = ""
    python_version: str = ""
    torch: str = ""
    torch_error: str = ""
    cuda: str = ""
    cuda_available: bool = False
    gpus_visible: int = 0
    scontrol: str = ""
    error: str = ""


@dataclass
class SiteFacts:
    cluster: str
    slurm_version: str
    select_type: str
    accounting_storage: str
    #: "" when sacct answers; else what it said.
    accounting_error: str
    gpus_per_node_ok: bool
    #: How that was found: sbatch --test-only's answer, or the select plugin.
    gpus_per_node_how: str
    max_array_size: int | None
    job_file_append: bool
    preempt_mode: str
    preempt_type: str
    preempt_signal: bool
    nodes: list[NodeInfo] = field(default_factory=list)
    partitions: list[Partition] = field(default_factory=list)
    probed_at: str = ""
    compute: ComputeNode | None = None
    version: int = FACTS_VERSION

    @property
    def accounting(self) -> bool:
        return not self.accounting_error and not self.accounting_storage.endswith("/none") \
            and self.accounting_storage not in ("", "(null)")

    @property
    def cons_tres(self) -> bool:
        """--mem-per-gpu (like every --gpus* option) needs select/cons_tres."""
        return self.select_type == "select/cons_tres"

    def partition(self, name: str | None) -> Partition | None:
        for p in self.partitions:
            if (p.name == name) if name else p.default:
                return p
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteFacts:
        data = dict(data)
        data["nodes"] = [NodeInfo(**n) for n in data.get("nodes", [])]
        data["partitions"] = [Partition(**p) for p in data.get("partitions", [])]
        data["compute"] = ComputeNode(**data["compute"]) if data.get("compute") else None
        return cls(**data)

    def matches(self, config: dict[str, str]) -> bool:
        """Whether ``scontrol show config`` (parsed) still says what these facts were made from."""
        now = _config_facts(config, "")
        return all(getattr(self, k) == v for k, v in now.items())


# ---------------------------------------------------------------------------------------------
# Facts from the scheduler's outputs (pure: unit-tested on recorded outputs of both versions)


def _config_facts(config: dict[str, str], raw: str) -> dict[str, Any]:
    version = config.get("SLURM" + "_VERSION") or (m.group(1) if (m := _VERSION_RE.search(raw))
                                                   else "")
    array = config.get("MaxArraySize", "")
    params = config.get("PreemptParameters", "")
    return {
        "cluster": config.get("ClusterName", "").lower(),
        "slurm_version": version,
        "select_type": config.get("SelectType", ""),
        "accounting_storage": config.get("AccountingStorageType", ""),
        "max_array_size": int(array) if array.isdigit() else None,
        "job_file_append": config.get("JobFileAppend", "0") == "1",
        "preempt_mode": config.get("PreemptMode", "OFF"),
        "preempt_type": config.get("PreemptType", "(null)"),
        "preempt_signal": "send_user_signal" in params.lower(),
    }


def parse_partitions(out: str) -> list[Partition]:
    parts = []
    for kv in slurm.parse_partitions(out):
        nodes = kv.get("MaxNodes", "UNLIMITED")
        parts.append(Partition(kv["PartitionName"], kv.get("Default") == "YES",
                               kv.get("MaxTime", "UNLIMITED"),
                               int(nodes) if nodes.isdigit() else None, kv.get("PreemptMode", "")))
    return parts


def gpus_per_node_rule(select_type: str) -> tuple[bool, str]:
    """What the select plugin implies: ``--gpus*`` options need select/cons_tres."""
    ok = select_type == "select/cons_tres"
    return ok, f"SelectType={select_type or 'unknown'} ({'' if ok else 'not '}cons_tres)"


def facts_from_outputs(config_text: str, sinfo_text: str, partitions_text: str,
                       accounting_error: str, gpus_per_node: tuple[bool, str] | None = None,
                       probed_at: str = "") -> SiteFacts:
    """The site's facts from ``scontrol show config``, ``sinfo -N -o %N|%P|%c|%m|%G|%T``,
    ``scontrol show partition -o``, sacct's answer and (if run) the ``--test-only`` verdict."""
    config = slurm.parse_show_config(config_text)
    facts = _config_facts(config, config_text)
    ok, how = gpus_per_node if gpus_per_node is not None else gpus_per_node_rule(
        facts["select_type"])
    nodes, _ = slurm.parse_sinfo(sinfo_text)
    return SiteFacts(**facts, accounting_error=accounting_error, gpus_per_node_ok=ok,
                     gpus_per_node_how=how, nodes=nodes,
                     partitions=parse_partitions(partitions_text), probed_at=probed_at)


# ---------------------------------------------------------------------------------------------
# Probing and the cache


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hpcpipe"


def cache_path(cluster: str) -> Path:
    return cache_dir() / f"site-{re.sub(r'[^A-Za-z0-9_.-]', '_', cluster) or 'unnamed'}.json"


def load_cached(cluster: str) -> SiteFacts | None:
    """The cached facts of ``cluster``; None where there are none or they cannot be read
    (damaged, or written by another hpcpipe version): they are probed again."""
    try:
        data = json.loads(cache_path(cluster).read_text())
        facts = SiteFacts.from_dict(data)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return facts if facts.version == FACTS_VERSION else None


def save(facts: SiteFacts) -> Path | None:
    """Cache the facts (temporary name + rename); a cache that cannot be written is no error."""
    path = cache_path(facts.cluster)
    try:
        files.write_json(path, facts.to_dict())
    except OSError:
        return None
    return path


def _test_only_gpus_per_node(select_type: str) -> tuple[bool, str]:
    """Ask the controller whether it takes ``--gpus-per-node``. A refusal only counts where the
    same request as ``--gres=gpu:1`` is taken; where both are refused (no GPU in the default
    partition) the select plugin decides."""
    ok, said = slurm.sbatch_test_only(["--gpus-per-node=1", "--time=1", "--output=/dev/null"])
    if ok:
        return True, "sbatch --test-only --gpus-per-node=1 accepted"
    gres_ok, _ = slurm.sbatch_test_only(["--gres=gpu:1", "--time=1", "--output=/dev/null"])
    if gres_ok:
        return False, f"sbatch --test-only --gpus-per-node=1 refused ({said}); --gres=gpu:1 accepted"
    rule_ok, rule = gpus_per_node_rule(select_type)
    return rule_ok, f"{rule}; sbatch --test-only could place no GPU at all ({said})"


def probe(test_only: bool = True, config_text: str | None = None) -> SiteFacts:
    """Ask the scheduler (a handful of calls) and return the facts; not cached here."""
    config_text = slurm.show_config() if config_text is None else config_text
    select = slurm.parse_show_config(config_text).get("SelectType", "")
    sinfo = slurm.call(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%m|%G|%T"])
    gpus = _test_only_gpus_per_node(select) if test_only else None
    return facts_from_outputs(config_text, sinfo, slurm.show_partitions(),
                              slurm.accounting_answer(), gpus,
                              probed_at=time.strftime("%Y-%m-%dT%H:%M:%S"))


def for_layout_check() -> SiteFacts:
    """The facts submit and rerun render and check with: the cached ones where ``scontrol show
    config`` still matches them, else probed once (without a test job) and cached. Node
    shapes are always read live (the layout check's one sinfo)."""
    config_text = slurm.show_config()
    config = slurm.parse_show_config(config_text)
    cached = load_cached(config.get("ClusterName", "").lower())
    if cached is not None and cached.matches(config):
        cached.nodes, _ = slurm.nodes()
        return cached
    facts = probe(test_only=False, config_text=config_text)
    save(facts)
    return facts


# ---------------------------------------------------------------------------------------------
# The probe job: what a compute node sees


_PROBE_PY = """import json, sys
d = {"python": sys.executable, "python_version": sys.version.split()[0]}
try:
    import torch
    d.update(torch=torch.__version__, cuda=torch.version.cuda or "",
             cuda_available=torch.cuda.is_available(), gpus_visible=torch.cuda.device_count())
except Exception as exc:
    d["torch_error"] = repr(exc)[:300]
print("hpcpipe-probe " + json.dumps(d))
"""


def probe_job_script(output: Path, python: str, gpu_request: str | None) -> str:
    lines = ["#!/bin/bash", "#SBATCH --job-name=hpcpipe-doctor",
             f'#SBATCH --output="{str(output).replace("%", "%%")}"', "#SBATCH --time=1",
             "#SBATCH --nodes=1", "#SBATCH --ntasks=1", "#SBATCH --cpus-per-task=1"]
    if gpu_request:
        lines.append(f"#SBATCH {gpu_request}")
    lines += ['echo "hpcpipe-probe-node $(hostname)"',
              'echo "hpcpipe-probe-scontrol $(command -v scontrol || true)"',
              f"{shlex.quote(python)} -c {shlex.quote(_PROBE_PY)} || "
              'echo "hpcpipe-probe-error python failed with exit code $?"']
    return "\n".join(lines) + "\n"


def parse_probe_output(text: str) -> ComputeNode:
    node = ComputeNode()
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word == "hpcpipe-probe":
            data = json.loads(rest)
            names = {f.name for f in dataclasses.fields(ComputeNode)}
            node = dataclasses.replace(node, **{k: v for k, v in data.items() if k in names})
        elif word == "hpcpipe-probe-node":
            node.node = rest.strip()
        elif word == "hpcpipe-probe-scontrol":
            node.scontrol = rest.strip()
        elif word == "hpcpipe-probe-error":
            node.error = rest.strip()
    if not node.python and not node.error:
        node.error = "the probe job printed nothing hpcpipe could read"
    return node


def run_probe_job(facts: SiteFacts, python: str | None = None, timeout_s: float = 300,
                  poll_s: float = 2.0) -> ComputeNode:
    """Run a 1-minute job that reports what a compute node sees; cancel it if it has not
    ended within ``timeout_s`` (a busy queue), saying why it waited."""
    folder = cache_dir() / "probe"
    folder.mkdir(parents=True, exist_ok=True)  # Slurm < 23.02 does not make it
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = folder / f"{facts.cluster}-{stamp}.out"
    part = facts.partition(None)
    gpus = [n.gpus for n in facts.nodes if part is None or part.name in n.partitions]
    request = gpu_request(facts, 1) if gpus and max(gpus) > 0 else None
    script = folder / f"{facts.cluster}-{stamp}.sbatch"
    files.write_text(script, probe_job_script(out, python or sys.executable, request))
    job = slurm.sbatch(str(script))
    deadline = time.monotonic() + timeout_s
    info = None
    while time.monotonic() < deadline:
        info = slurm.query([job]).get(job)
        if info is not None and info.terminal:
            break
        time.sleep(poll_s)
    else:
        slurm.scancel([job])
        why = f" ({info.state}, reason {info.reason})" if info is not None else ""
        return ComputeNode(error=f"probe job {job} did not end within {timeout_s:.0f} s{why}; "
                                 "cancelled")
    for _ in range(10):  # the log may reach a shared file system a moment after the job ends
        if out.is_file() and "hpcpipe-probe" in out.read_text(errors="replace"):
            break
        time.sleep(0.5)
    text = out.read_text(errors="replace") if out.is_file() else ""
    node = parse_probe_output(text)
    if info is not None and info.state != "COMPLETED":
        node.error = (node.error + "; " if node.error else "") + \
            f"probe job {job} ended {info.state} {info.exit_code}".rstrip()
    return node


def doctor(probe_job: bool = False, probe_timeout_s: float = 300) -> tuple[SiteFacts, Path | None]:
    """Probe afresh (with ``sbatch --test-only``, and the probe job if asked) and cache."""
    facts = probe(test_only=True)
    if probe_job:
        facts.compute = run_probe_job(facts, timeout_s=probe_timeout_s)
    elif (old := load_cached(facts.cluster)) is not None:
        facts.compute = old.compute  # keep an earlier probe job's findings
    return facts, save(facts)


# ---------------------------------------------------------------------------------------------
# What hpcpipe does with the facts


def gpu_request(facts: SiteFacts | None, gpus_per_node: int) -> str:
    """The sbatch option asking for GPUs on each node, in the form the site takes."""
    if facts is not None and facts.gpus_per_node_ok:
        return f"--gpus-per-node={gpus_per_node}"
    return f"--gres=gpu:{gpus_per_node}"


def _span(values: list[int], unit: str = "") -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"


def explain(facts: SiteFacts) -> list[tuple[str, str]]:
    """(fact, what hpcpipe does differently because of it), in the order doctor prints them."""
    out: list[tuple[str, str]] = []
    major = ".".join(facts.slurm_version.split(".")[:2])
    tested = "tested with hpcpipe" if major in TESTED_VERSIONS else \
        f"not tested with hpcpipe (tested: {', '.join(TESTED_VERSIONS)}); should work, report what does not"
    out.append((f"Slurm {facts.slurm_version or 'unknown'}, cluster {facts.cluster}",
                f"{tested}. The log folder is made before sbatch (before 23.02 Slurm fails a "
                "job whose log folder is missing); srun gets --cpus-per-task explicitly "
                "(22.05-23.02 do not pass it on)"))
    if facts.accounting:
        out.append((f"accounting on ({facts.accounting_storage}, sacct answers)",
                    "status asks sacct about jobs squeue has forgotten; summarize reports CPU "
                    "efficiency and peak memory"))
    else:
        why = facts.accounting_error or facts.accounting_storage
        out.append((f"accounting off ({why})",
                    "status falls back to `scontrol show job` while the controller still knows "
                    "a job (MinJobAge); summarize has no CPU or memory figures"))
    if facts.gpus_per_node_ok:
        out.append((f"{facts.select_type}: --gpus-per-node taken ({facts.gpus_per_node_how})",
                    "GPU requests as --gpus-per-node=N; train.mem_per_gpu as --mem-per-gpu"))
    else:
        out.append((f"{facts.select_type or 'select plugin unknown'}: --gpus-per-node not taken "
                    f"({facts.gpus_per_node_how})",
                    "GPU requests as --gres=gpu:N: this site's select plugin does not take "
                    "--gpus-per-node; train.mem_per_gpu as --mem = mem_per_gpu x GPUs per node"))
    for p in facts.partitions:
        nodes = [n for n in facts.nodes if p.name in n.partitions]
        shape = (f"{len(nodes)} node(s), CPUs {_span([n.cpus for n in nodes])}, memory "
                 f"{_span([n.memory_mb for n in nodes], ' MB')}, GPUs {_span([n.gpus for n in nodes])}")
        limits = f"MaxTime {p.max_time}, MaxNodes {p.max_nodes or 'UNLIMITED'}"
        out.append((f"partition {p.name}{' (default)' if p.default else ''}: {shape}; {limits}",
                    "submit and rerun refuse, before queueing and naming the key, a step asking "
                    "more CPUs, memory or GPUs per node than these nodes have, a time above "
                    "MaxTime, or more nodes than MaxNodes"))
    out.append((f"MaxArraySize {facts.max_array_size if facts.max_array_size is not None else '?'}",
                "nothing: hpcpipe submits one job per step, no job arrays"))
    out.append((f"JobFileAppend {int(facts.job_file_append)}",
                "scripts say --open-mode=append anyway, so a requeued job's log keeps what "
                "the earlier start wrote" if facts.job_file_append else
                "scripts say --open-mode=append: without it a requeued job's log would be "
                "truncated at each restart"))
    preempt = f"PreemptMode {facts.preempt_mode}, PreemptType {facts.preempt_type}"
    if facts.preempt_mode.upper().startswith("OFF") or facts.preempt_type.endswith("/none"):
        out.append((preempt, "no preemption: train checkpoints on the time-limit warning "
                             "(USR2, train.signal_seconds before the limit) and on SIGTERM"))
    elif facts.preempt_signal:
        out.append((f"{preempt}, send_user_signal on",
                    "a preempted train job gets USR2 first (its --signal), checkpoints and "
                    "requeues"))
    else:
        out.append((f"{preempt}, no warning signal (PreemptParameters lacks send_user_signal)",
                    "a preempted train job gets only SIGTERM, then SIGKILL after GraceTime: it "
                    "checkpoints on SIGTERM at the next step boundary, so keep a step well "
                    "under GraceTime; earlier work is kept by train.checkpoint_every"))
    if facts.compute is not None:
        out += _explain_compute(facts.compute)
    else:
        out.append(("compute nodes not probed",
                    "run `hpcpipe doctor --probe-job` to check Python, torch and scontrol there"))
    return out


def _explain_compute(c: ComputeNode) -> list[tuple[str, str]]:
    where = f"on {c.node}" if c.node else "on a compute node"
    if c.error and not c.python:
        return [(f"probe job: {c.error}", "nothing known of the compute nodes; train may still "
                                          "fail there")]
    out = [(f"python {c.python_version} {where} ({c.python})",
            "the jobs run this interpreter unless slurm.python says otherwise")]
    if c.torch:
        cuda = f"CUDA {c.cuda}, {c.gpus_visible} GPU(s) visible" if c.cuda_available else \
            f"CUDA {'build ' + c.cuda + ' but ' if c.cuda else ''}not available"
        out.append((f"torch {c.torch} ({cuda})",
                    "train uses NCCL on the GPUs" if c.cuda_available else
                    "train would run on CPU with gloo: install a CUDA build of torch, or load "
                    "CUDA in slurm.setup"))
    else:
        out.append((f"torch not importable ({c.torch_error})",
                    "train would fail at once: install torch for slurm.python, or activate its "
                    "environment in slurm.setup"))
    out.append((f"scontrol {'at ' + c.scontrol if c.scontrol else 'not on PATH'} in the job",
                "the job shell can requeue itself and expand the node list" if c.scontrol else
                "jobs cannot call scontrol (a container?): the rendezvous host comes from the "
                "node list parsed in Python"))
    if c.error:
        out.append((f"probe job: {c.error}", "see the probe's log under " + str(cache_dir())))
    return out


def report(facts: SiteFacts, cached_at: Path | None) -> str:
    lines = []
    for fact, action in explain(facts):
        lines.append(f"- {fact}\n    -> {action}")
    lines.append(f"facts cached at {cached_at}" if cached_at else "facts could not be cached")
    return "\n".join(lines)

