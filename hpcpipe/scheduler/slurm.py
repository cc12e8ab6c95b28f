"""The one door to Slurm.

Every ``sbatch``/``squeue``/``sacct``/``scancel``/``scontrol``/``sinfo`` call goes through
:func:`call`, with arguments as a list (never a shell string). A failure raises
:class:`~hpcpipe.errors.SchedulerError` carrying the command, exit code, stdout and stderr; a
controller that does not answer raises :class:`~hpcpipe.errors.SchedulerUnreachableError`.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from hpcpipe.errors import PartialAnswer, SchedulerError, SchedulerUnreachableError
from hpcpipe.scheduler.base import JobInfo

log = logging.getLogger(__name__)

_UNREACHABLE = re.compile(
    r"Unable to contact slurm controller|Connection refused|Socket timed out|"
    r"Zero Bytes were transmitted|Unable to establish controller|slurm_load_jobs error: Unable",
    re.I,
)
_ACCOUNTING_OFF = re.compile(r"accounting storage is disabled|slurmdbd.*(down|connection)", re.I)

def call(cmd: list[str], timeout: float = 60) -> str:
    """Run one scheduler command and return its stdout; raise SchedulerError on failure."""
    log.debug("scheduler: %s", cmd)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise SchedulerError(cmd, None, "", f"{cmd[0]} is not on PATH ({exc})") from None
    except subprocess.TimeoutExpired as exc:
        raise SchedulerUnreachableError(
            cmd, None, str(exc.stdout or ""), f"no answer from the scheduler within {timeout:.0f} s"
        ) from None
    if proc.returncode != 0:
        err = SchedulerUnreachableError if _UNREACHABLE.search(proc.stderr) else SchedulerError
        raise err(cmd, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# Submitting and cancelling


def sbatch(script: str, args: Sequence[str] = ()) -> str:
    """Submit a script file with ``sbatch --parsable``; return the job id."""
    out = call(["sbatch", "--parsable", *args, script])
    job_id = out.strip().split(";")[0]  # "<id>[;<cluster>]"
    if not job_id.isdigit():
        raise SchedulerError(["sbatch", *args, script], 0, out, "sbatch printed no job id")
    return job_id


def scancel(job_ids: list[str], signal: str | None = None) -> None:
    if not job_ids:
        return
    cmd = ["scancel"] + ([f"--signal={signal}"] if signal else []) + list(job_ids)
    call(cmd)


def jobs_named(name: str) -> list[str]:
    """Ids of the jobs called ``name`` that the controller knows (queued, running or just ended)."""
    out = call(["squeue", "-h", "--states=all", f"--name={name}", "-o", "%i"])
    return [line.strip() for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Querying jobs


def _started_at(state: str, start: str, nodes: str) -> str:
    """The time a job really started, or "" if it never ran.

    Slurm fills the start field where no job ran: squeue shows a pending job's *expected* start
    and a job cancelled while pending gets its cancel time as start. Only a job that was given
    nodes has started.
    """
    if state.startswith("PENDING") or nodes in ("", "(null)", "None assigned"):
        return ""
    return "" if start in ("N/A", "Unknown", "None") else start


_SQUEUE_FIELDS = ["JobID", "State", "Reason", "TimeUsed", "TimeLimit", "NodeList", "Restartcnt",
                  "SubmitTime", "StartTime", "Dependency"]


def squeue(job_ids: list[str]) -> dict[str, JobInfo]:
    """Live state of the given jobs in one call; jobs Slurm has forgotten are absent."""
    if not job_ids:
        return {}
    fmt = ",".join(f"{f}:|" for f in _SQUEUE_FIELDS)
    cmd = ["squeue", "-h", "--states=all", "-j", ",".join(job_ids), "-O", fmt]
    try:
        out = call(cmd)
    except SchedulerUnreachableError:
        raise
    except SchedulerError as exc:
        # squeue fails outright when every id is unknown ("Invalid job id specified").
        if "Invalid job id" in exc.stderr:
            return {}
        raise
    return parse_squeue(out)


def parse_squeue(out: str) -> dict[str, JobInfo]:
    """Parse ``squeue -h -O <_SQUEUE_FIELDS, each :|>`` output (the same in 22.05 and 25.11)."""
    jobs: dict[str, JobInfo] = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < len(_SQUEUE_FIELDS):
            continue
        jid, state, reason, used, limit, nodes, restarts, submit, start, dep = parts[:10]
        if "(failed)" in dep:
            # e.g. "afterok:370(failed)": the reason may still read ReqNodeNotAvail or Dependency
            # for a moment, but this job can never start.
            reason = "DependencyNeverSatisfied"
        jobs[jid] = JobInfo(
            job_id=jid, state=state.split()[0] if state else "UNKNOWN",
            reason="" if reason in ("None", "(null)") else reason, elapsed=used, time_limit=limit,
            nodes="" if nodes in ("(null)", "") else nodes,
            restarts=int(restarts) if restarts.isdigit() else 0,
            submit=submit, start=_started_at(state, start, nodes), source="squeue",
        )
    return jobs


_SACCT_BASE = ["JobID", "State", "ExitCode", "Elapsed", "Timelimit", "NodeList", "Submit",
               "Start", "End", "Reason", "AllocCPUS", "TotalCPU", "MaxRSS", "ReqMem"]
#: GPU use per step, where the site accounts it (Slurm 23.02+ with AccountingStorageTRES including
#: gres/gpuutil and gres/gpumem, gathered through NVML): gres/gpuutil in % and gres/gpumem in
#: bytes with a unit, per task (summed over the node's GPUs from 24.05). Last, so that output of
#: a sacct without them (or a recorded fixture) still parses.
_SACCT_GPU = ["TRESUsageInAve", "TRESUsageInMax"]
_SACCT_FIELDS = _SACCT_BASE + _SACCT_GPU


_REQ_MEM = re.compile(r"[\d.]+[KMGTP]?[nc]?")


class AccountingDisabled(SchedulerError):
    """sacct answered that accounting storage is disabled on this cluster."""


def sacct(job_ids: list[str]) -> dict[str, JobInfo]:
    """Accounting records of the given jobs in one call (with per-step MaxRSS folded in)."""
    if not job_ids:
        return {}
    cmd = ["sacct", "-n", "-P", "-D", "-j", ",".join(job_ids), "-o", ",".join(_SACCT_FIELDS)]
    try:
        out = call(cmd)
    except SchedulerUnreachableError:
        raise
    except SchedulerError as exc:
        if _ACCOUNTING_OFF.search(exc.stderr + exc.stdout):
            raise AccountingDisabled(exc.cmd, exc.returncode, exc.stdout, exc.stderr) from None
        raise
    return parse_sacct(out)


def parse_sacct(out: str) -> dict[str, JobInfo]:
    """Parse ``sacct -P -D`` output: the last allocation row per job wins; steps add MaxRSS."""
    jobs: dict[str, JobInfo] = {}
    requeues: dict[str, int] = {}
    max_rss: dict[str, int] = {}
    gpu: dict[str, dict[str, float]] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < len(_SACCT_BASE):
            continue
        row = dict(zip(_SACCT_FIELDS, parts, strict=False))
        jid = row["JobID"]
        base = jid.split(".")[0].split("_")[0]
        if "." in jid:  # a job step: keep the largest MaxRSS, and the largest GPU use
            rss = parse_mem(row["MaxRSS"])
            if rss is not None:
                max_rss[base] = max(max_rss.get(base, 0), rss)
            for key, value in parse_gpu_tres(row.get("TRESUsageInAve", ""),
                                             row.get("TRESUsageInMax", "")).items():
                gpu.setdefault(base, {})[key] = max(gpu.get(base, {}).get(key, 0), value)
            continue
        state = row["State"].split()[0] if row["State"] else "UNKNOWN"
        by = row["State"].split(" by ")[1].strip() if " by " in row["State"] else ""
        if state == "REQUEUED":
            requeues[base] = requeues.get(base, 0) + 1
        reason = "" if row["Reason"] == "None" else row["Reason"]
        started = row["Start"] not in ("None", "Unknown", "")
        if state == "CANCELLED" and reason == "Dependency" and not started and not by:
            # --kill-on-invalid-dep cancelled it before it ever started; sacct keeps only the
            # pending reason where squeue says DependencyNeverSatisfied.
            reason = "DependencyNeverSatisfied"
        elif started and state not in ("PENDING", "REQUEUED"):
            reason = ""  # sacct's Reason is the last pending reason, stale once the job ran
        info = JobInfo(
            job_id=base, state=state, reason=reason,
            elapsed=row["Elapsed"], time_limit=row["Timelimit"],
            nodes="" if row["NodeList"] in ("None assigned", "") else row["NodeList"],
            exit_code=row["ExitCode"], submit=row["Submit"],
            start=_started_at(state, row["Start"], row["NodeList"]),
            end="" if row["End"] in ("Unknown", "None") else row["End"], source="sacct",
            extra={"alloc_cpus": row["AllocCPUS"], "total_cpu": row["TotalCPU"],
                   # a record slurmdbd has not completed yet shows e.g. "16?"
                   "req_mem": row["ReqMem"] if _REQ_MEM.fullmatch(row["ReqMem"]) else "",
                   "cancelled_by": by},
        )
        jobs[base] = info
    for base, info in jobs.items():
        info.restarts = requeues.get(base, 0)
        if base in max_rss:
            info.extra["max_rss_bytes"] = str(max_rss[base])
        for key, value in gpu.get(base, {}).items():
            info.extra[key] = f"{value:.0f}" if key == "gpu_mem_max" else f"{value:g}"
    return jobs


def parse_gpu_tres(ave: str, peak: str) -> dict[str, float]:
    """GPU use of one step from sacct's TRESUsageInAve and TRESUsageInMax (``...,gres/gpumem=
    1234M,gres/gpuutil=87,...``): gpu_util_ave and gpu_util_max in %, gpu_mem_max in bytes;
    only what the site records."""
    out: dict[str, float] = {}
    for text, suffix in ((ave, "ave"), (peak, "max")):
        for item in text.split(","):
            key, _, value = item.partition("=")
            if key == "gres/gpuutil" and value.replace(".", "", 1).isdigit():
                out[f"gpu_util_{suffix}"] = float(value)
            elif key == "gres/gpumem" and suffix == "max":
                mem = parse_mem(value)
                if mem is not None:
                    out["gpu_mem_max"] = float(mem)
    return out


def scontrol_jobs(job_ids: list[str]) -> dict[str, JobInfo]:
    """Fallback where sacct is disabled: ``scontrol show job`` while Slurm still knows the job."""
    jobs: dict[str, JobInfo] = {}
    for jid in job_ids:
        try:
            out = call(["scontrol", "show", "job", "-o", jid])
        except SchedulerUnreachableError:
            raise
        except SchedulerError:
            continue  # forgotten by the controller
        kv = parse_scontrol(out)
        if not kv:
            continue
        jobs[jid] = JobInfo(
            job_id=jid, state=kv.get("JobState", "UNKNOWN"),
            reason="" if kv.get("Reason") in (None, "None") else kv["Reason"],
            elapsed=kv.get("RunTime", ""), time_limit=kv.get("TimeLimit", ""),
            nodes="" if kv.get("NodeList") in (None, "(null)") else kv["NodeList"],
            exit_code=kv.get("ExitCode", ""), restarts=int(kv.get("Restarts", "0") or 0),
            submit=kv.get("SubmitTime", ""),
            start=_started_at(kv.get("JobState", ""), kv.get("StartTime", ""), kv.get("NodeList", "")),
            end=kv.get("EndTime", ""), source="scontrol",
        )
    return jobs


def parse_scontrol(out: str) -> dict[str, str]:
    """``Key=Value Key2=Value two`` (one line from ``-o``) into a dict."""
    kv: dict[str, str] = {}
    for m in re.finditer(r"(\w[\w:/]*)=(.*?)(?=\s+\w[\w:/]*=|$)", out.strip()):
        kv[m.group(1)] = m.group(2).strip()
    return kv


def query(job_ids: list[str]) -> dict[str, JobInfo]:
    """State of jobs from squeue, then sacct (or scontrol where accounting is off) for the rest.

    At most two scheduler calls when accounting works, however many jobs.
    squeue knows neither the exit code nor who cancelled a job, so jobs it shows as ended other
    than COMPLETED are asked about in the same sacct call as the jobs it has forgotten (a run
    that went well needs no sacct call at all); where accounting has not caught up yet,
    squeue's state stands and only sacct's figures are added.
    """
    jobs = squeue(job_ids)
    rest = [j for j in job_ids if j not in jobs]
    ended = [j for j, info in jobs.items() if info.terminal and info.state != "COMPLETED"]
    if rest or ended:
        try:
            accounted = sacct(rest + ended)
        except AccountingDisabled:
            jobs.update(scontrol_jobs(rest))
            return jobs
        except SchedulerError as exc:
            # The controller answered (squeue) but accounting did not (slurmdbd down, say): keep
            # every answer the controller gives, ask it for the forgotten jobs too, and name
            # the jobs nobody could say anything about rather than hiding the good answers.
            jobs.update(scontrol_jobs(rest))
            unknown = [j for j in job_ids if j not in jobs]
            if unknown:
                raise PartialAnswer(jobs, unknown, exc) from None
            return jobs
        for jid, info in accounted.items():
            live = jobs.get(jid)
            if live is None or info.terminal:
                if live is not None:
                    info.restarts = max(info.restarts, live.restarts)
                    if live.reason:  # squeue's is the controller's own; sacct's may be stale
                        info.reason = live.reason
                jobs[jid] = info
            else:
                live.extra.update({k: v for k, v in info.extra.items() if v})
                live.exit_code = live.exit_code or info.exit_code
    return jobs


# ---------------------------------------------------------------------------------------------
# Cluster shape, for checking a layout before anything is queued


@dataclass
class NodeInfo:
    name: str
    partitions: list[str]
    cpus: int
    memory_mb: int
    gpus: int
    state: str


def nodes() -> tuple[list[NodeInfo], str | None]:
    """All nodes with their partitions, CPUs, memory and GPU count; and the default partition."""
    return parse_sinfo(call(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%m|%G|%T"]))


def parse_sinfo(out: str) -> tuple[list[NodeInfo], str | None]:
    """Parse ``sinfo -h -N -o "%N|%P|%c|%m|%G|%T"``: one line per node and partition."""
    by_name: dict[str, NodeInfo] = {}
    default = None
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < 6:
            continue
        name, part, cpus, mem, gres, state = (p.strip() for p in parts[:6])
        if part.endswith("*"):
            part = part[:-1]
            default = part
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[\w.-]+)?:(\d+)", gres))
        node = by_name.setdefault(name, NodeInfo(name, [], int(cpus.rstrip("+") or 0),
                                                  int(re.sub(r"\D", "", mem) or 0), gpus, state))
        node.partitions.append(part)
    return list(by_name.values()), default


def parse_mem(text: str) -> int | None:
    """Slurm memory text (``1234K``, ``2G``, ``500M``, ``4000Mn``) to bytes."""
    m = re.match(r"^([\d.]+)([KMGTP]?)", (text or "").strip())
    if not m:
        return None
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}[m.group(2)]
    return int(float(m.group(1)) * mult)


# ---------------------------------------------------------------------------------------------
# What the site is: read by hpcpipe.scheduler.site (``hpcpipe doctor`` and the layout check)


def show_config() -> str:
    """``scontrol show config`` as printed (``Key = Value`` lines)."""
    return call(["scontrol", "show", "config"])


def parse_show_config(out: str) -> dict[str, str]:
    """``Key = Value`` lines into a dict; keys that a version does not print are simply absent
    (25.11 dropped some and prints ``(null)`` for others, VERSIONS.md item 11)."""
    kv: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            kv[key.strip()] = value.strip()
    return kv


def show_partitions() -> str:
    """``scontrol show partition -o``: one line per partition."""
    return call(["scontrol", "show", "partition", "-o"])


def parse_partitions(out: str) -> list[dict[str, str]]:
    return [parse_scontrol(line) for line in out.splitlines() if line.startswith("PartitionName=")]


def accounting_answer() -> str:
    """"" if sacct answers (asked about a job id that need not exist: empty output, rc 0 on both
    versions), else what it said instead."""
    try:
        call(["sacct", "-n", "-P", "-X", "-j", "1", "-o", "JobID"], timeout=30)
    except SchedulerUnreachableError:
        raise
    except SchedulerError as exc:
        return (exc.stderr or exc.stdout).strip() or f"sacct failed with exit code {exc.returncode}"
    return ""


def sbatch_test_only(args: Sequence[str]) -> tuple[bool, str]:
    """``sbatch --test-only ARGS --wrap true``: whether the controller would take the request
    (its exit code; the text differs between versions, VERSIONS.md item 8), and its complaint."""
    try:
        call(["sbatch", "--test-only", *args, "--wrap", "true"], timeout=30)
    except SchedulerUnreachableError:
        raise
    except SchedulerError as exc:
        lines = (exc.stderr or exc.stdout).strip().splitlines()
        return False, lines[-1] if lines else f"exit code {exc.returncode}"
    return True, ""
