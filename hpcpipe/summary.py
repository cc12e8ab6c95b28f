"""``hpcpipe summarize``: one report per run, and a diagnosis of what went wrong.

The report reads the run's state file (job states, sacct figures cached there), its metrics file
and, for steps that did not complete, their logs, streamed line by line so a log of gigabytes takes
constant memory. Each diagnosis names the evidence line and the next thing to do.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcpipe import scheduler
from hpcpipe.metrics import read_metrics
from hpcpipe.run import Run


@dataclass
class Diagnosis:
    step: str
    problem: str
    evidence: str
    action: str


# Log patterns, most specific first. Each: (name, regex on one line).
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("cuda_oom", re.compile(r"CUDA out of memory|torch\.(cuda\.)?OutOfMemoryError")),
    ("host_oom", re.compile(r"[Ee]xceeded (job )?memory limit|oom[-_]kill|Out Of Memory|"
                            r"OUT_OF_MEMORY|Killed process \d+|MemoryError")),
    ("nccl", re.compile(r"NCCL (error|WARN .*[Tt]imeout)|ncclInternalError|ncclSystemError|"
                        r"Watchdog caught collective operation timeout|ProcessGroupNCCL.*[Tt]imeout")),
    ("timeout", re.compile(r"DUE TO TIME LIMIT")),
    ("preempted", re.compile(r"DUE TO PREEMPTION")),
    ("node_fail", re.compile(r"DUE TO NODE FAIL|Node failure on|NODE_FAIL")),
    ("cancelled", re.compile(r"\*\*\* (JOB|STEP) [\d.]+ ON \S+ CANCELLED AT (?!.*DUE TO)")),
    ("requeue", re.compile(r"requeu(e|ing)", re.I)),
]
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)")
_FRAME = re.compile(r'^\s*(\d+: )?\s*File "([^"]+)", line (\d+), in (\S+)')
_EXC_LINE = re.compile(r"^\s*(\d+: )?([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*)$")
_HPCPIPE_ERR = re.compile(r"(InputError|ConfigError|RunError): (.*)")


def scan_log(path: Path) -> dict[str, Any]:
    """One streamed pass over a log: the last line matching each pattern and the last traceback."""
    found: dict[str, Any] = {}
    in_tb = False
    last_frame = ""
    if not path.exists():
        return found
    with open(path, "rb") as f:
        for raw in f:
            if b"\r" in raw:
                raw = raw.rsplit(b"\r", 1)[-1] or raw
            # Cheap byte checks first: most lines of a tqdm-heavy log match nothing.
            if not (b"rror" in raw or b"ERROR" in raw or b"***" in raw or b"emory" in raw
                    or b"Traceback" in raw or b"File \"" in raw or b"NCCL" in raw
                    or b"OOM" in raw or b"oom" in raw or b"equeu" in raw or b"Killed" in raw
                    or b"Exception" in raw or b"Interrupt" in raw or b"xit" in raw):
                continue
            line = raw.decode("utf-8", errors="replace").rstrip()
            if _TRACEBACK.search(line):
                in_tb, last_frame = True, ""
                continue
            if in_tb:
                m = _FRAME.match(line)
                if m:
                    last_frame = f"{m.group(2)}:{m.group(3)} in {m.group(4)}"
                    continue
                m = _EXC_LINE.match(line)
                if m:
                    found["traceback"] = (last_frame, m.group(2).strip())
                    in_tb = False
            for name, pat in _PATTERNS:
                if pat.search(line):
                    # The first line of a kind is the cause; later ones are its consequences.
                    found.setdefault(name, line.strip())
                    break
    return found


def _progress(run: Run, step: str) -> str:
    if step != "train":
        return ""
    evals = [m for m in read_metrics(run.layout.metrics) if m.get("step") == "train"
             and m.get("kind") == "eval"]
    try:
        from hpcpipe.pipeline import load_run_config

        epochs = load_run_config(run).train.epochs
    except Exception:  # noqa: BLE001 - the report must not fail on a damaged config
        epochs = None
    if not evals:
        return "; it had not finished an epoch"
    return f"; it reached epoch {evals[-1].get('epoch', 0) + 1}/{epochs or '?'}"


def diagnose(run: Run) -> list[Diagnosis]:
    """A diagnosis for each step whose current job did not complete."""
    out = []
    for step in run.steps():
        rec = run.current(step)
        state = rec.get("state", "")
        if state in ("COMPLETED", "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
            if state == "PENDING" and rec.get("reason") == "DependencyNeverSatisfied":
                pass
            else:
                continue
        found = scan_log(Path(rec.get("log", "")))
        if rec.get("reason") == "DependencyNeverSatisfied":
            ups = [(s, run.current(s)) for s in run.steps()[: run.steps().index(step)]]
            failed = [(s, r) for s, r in ups if r and r.get("state") != "COMPLETED"]
            who = ", ".join(f"{s} (job {r['job_id']}, {r['state']})" for s, r in failed) or \
                "an upstream job"
            out.append(Diagnosis(step, "DependencyNeverSatisfied: never ran",
                                 f"upstream {who} did not complete",
                                 "fix the upstream step, then `hpcpipe rerun "
                                 f"{failed[0][0] if failed else step}` (its downstream steps follow)"))
            continue
        if "cuda_oom" in found:
            out.append(Diagnosis(step, "CUDA out of memory", found["cuda_oom"],
                                 f"lower train.batch_size (raise train.grad_accum to keep the global "
                                 f"batch) or turn on train.grad_checkpointing, then `hpcpipe rerun "
                                 f"{step}`"))
        elif state == "OUT_OF_MEMORY" or "host_oom" in found:
            peak = f", peak {_bytes(rec['max_rss_bytes'])}" if rec.get("max_rss_bytes") else ""
            out.append(Diagnosis(step, "out of host memory (killed by Slurm/the kernel)",
                                 found.get("host_oom", f"sacct state {state}"),
                                 f"raise {step}.mem (requested {rec.get('req_mem') or 'default'}"
                                 f"{peak}) and `hpcpipe rerun {step} --set {step}.mem=<more>`"))
        elif "nccl" in found:
            out.append(Diagnosis(step, "NCCL error or collective timeout", found["nccl"],
                                 "check the nodes' network/GPUs (`sinfo -R`), exclude a bad node "
                                 "with slurm.extra_sbatch: [--exclude=NODE], then `hpcpipe rerun "
                                 f"{step}`: it resumes from the last checkpoint"))
        elif state == "TIMEOUT" or "timeout" in found:
            out.append(Diagnosis(step, "hit its time limit (TIMEOUT)",
                                 found.get("timeout", f"state TIMEOUT after {rec.get('elapsed')}"),
                                 f"raise --time for {step} (now {rec.get('time_limit') or '?'}) or "
                                 f"let it requeue; `hpcpipe rerun {step}` continues from where it "
                                 f"stopped{_progress(run, step)}"))
        elif state == "PREEMPTED" or "preempted" in found:
            out.append(Diagnosis(step, "preempted", found.get("preempted", "state PREEMPTED"),
                                 f"`hpcpipe rerun {step}` resumes it (it requeues itself when "
                                 "--requeue is allowed on the partition)"))
        elif state == "NODE_FAIL" or "node_fail" in found:
            out.append(Diagnosis(step, "a node failed (NODE_FAIL)",
                                 found.get("node_fail", f"state NODE_FAIL on {rec.get('nodes')}"),
                                 f"`hpcpipe rerun {step}` (add slurm.extra_sbatch: "
                                 f"[--exclude={rec.get('nodes') or 'NODE'}] if it repeats)"))
        elif state == "CANCELLED":
            by = rec.get("cancelled_by", "")
            if by.isdigit():
                by = _user_name(int(by))
            ev = found.get("cancelled", f"sacct: CANCELLED{' by ' + by if by else ''}")
            out.append(Diagnosis(step, f"cancelled{' by ' + by if by else ''}", ev,
                                 f"`hpcpipe rerun {step}` resumes it in place"
                                 + _progress(run, step)))
        elif "traceback" in found:
            frame, msg = found["traceback"]
            out.append(Diagnosis(step, f"Python exception: {msg}",
                                 f"{msg} (last frame: {frame})" if frame else msg,
                                 f"fix the cause shown, then `hpcpipe rerun {step}` "
                                 f"(log: {rec.get('log')})"))
        else:
            out.append(Diagnosis(step, f"ended {state} (exit {rec.get('exit_code', '?')})",
                                 "no known failure pattern in the log",
                                 f"read the log: `hpcpipe logs {step} {run.run_id}`"))
    return out


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _bytes(n: Any) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _seconds(text: str) -> float | None:
    """Slurm durations ([D-]HH:MM:SS[.ms], MM:SS) to seconds."""
    if not text:
        return None
    m = re.match(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)$", text.strip())
    if not m:
        return None
    d, h, mi, s = m.groups()
    return int(d or 0) * 86400 + int(h or 0) * 3600 + int(mi) * 60 + float(s)


def _queue_wait(rec: dict[str, Any]) -> str:
    try:
        sub = dt.datetime.fromisoformat(rec["submitted"])
        start = dt.datetime.fromisoformat(rec["start"])
    except (KeyError, ValueError, TypeError):
        return "-"
    secs = max(0, int((start - sub).total_seconds()))
    return f"{secs // 60}m{secs % 60:02d}s"


def build_report(run: Run) -> str:
    """The markdown report (also written to ``<run>/summary.md``)."""
    metrics = read_metrics(run.layout.metrics)
    lines = [f"# hpcpipe run {run.run_id}", "", f"backend: {run.backend_name}, created "
             f"{run.state.get('created', '?')}", "",
             "| step | job | state | elapsed | queue wait | CPU eff. | max RSS / requested | "
             "throughput | earlier jobs |", "|---|---|---|---|---|---|---|---|---|"]
    for step in run.steps():
        rec = run.current(step)
        eff = "-"
        total, elapsed = _seconds(rec.get("total_cpu", "")), _seconds(rec.get("elapsed", ""))
        cpus = int(rec.get("alloc_cpus") or 0)
        if total is not None and elapsed and cpus:
            eff = f"{100 * total / (elapsed * cpus):.0f}% of {cpus}"
        mem = "-"
        if rec.get("max_rss_bytes"):
            mem = f"{_bytes(rec['max_rss_bytes'])} / {rec.get('req_mem') or '?'}"
        summ = [m for m in metrics if m.get("step") == step and m.get("kind") == "summary"]
        thr = "-"
        if summ:
            s = summ[-1]
            if isinstance(s.get("rows_per_s"), (int, float)):
                thr = f"{s['rows_per_s']:,.0f} rows/s"
            elif isinstance(s.get("samples_per_s"), (int, float)):
                thr = f"{s['samples_per_s']:,.1f} samples/s"
        earlier = ", ".join(f"{j['job_id']} ({j.get('state', '?')})" for j in run.jobs(step)[:-1])
        lines.append(f"| {step} | {rec['job_id']} | {rec.get('state', '?')} | "
                     f"{rec.get('elapsed') or '-'} | {_queue_wait(rec)} | {eff} | {mem} | {thr} | "
                     f"{earlier or '-'} |")
    lines += ["", "## Step results", ""]
    for step in run.steps():
        summ = [m for m in metrics if m.get("step") == step and m.get("kind") == "summary"]
        if summ:
            s = {k: v for k, v in summ[-1].items() if k not in ("time", "step", "kind")}
            lines.append(f"- **{step}**: " + ", ".join(f"{k}={_fmt(v)}" for k, v in s.items()))
    evals = [m for m in metrics if m.get("step") == "train" and m.get("kind") == "eval"]
    if evals:
        lines += ["", "## Training", "", "| epoch | train loss | val MAE | val SMAPE | "
                  "SMAPE same-as-this-week | SMAPE roll_mean_4 | vs better baseline |",
                  "|---|---|---|---|---|---|---|"]
        losses = {}
        for m in metrics:
            if m.get("step") == "train" and m.get("kind") == "train":
                losses[m.get("epoch")] = m.get("loss")
        for e in evals:
            lines.append(
                f"| {e.get('epoch')} | {_fmt(losses.get(e.get('epoch')))} | {_fmt(e.get('val_mae'))}"
                f" | {_fmt(e.get('val_smape'))} | {_fmt(e.get('baseline_same_smape'))} | "
                f"{_fmt(e.get('baseline_roll4_smape'))} | {_fmt(e.get('improvement_pct'))}% |")
        best = min(evals, key=lambda e: e.get("val_smape", float("inf")))
        base = min(best.get("baseline_same_smape", 1e9), best.get("baseline_roll4_smape", 1e9))
        lines += ["", f"Best epoch {best.get('epoch')}: validation SMAPE "
                  f"{_fmt(best.get('val_smape'))} vs {_fmt(base)} for the better naive baseline, "
                  f"{_fmt(best.get('improvement_pct'))}% better."]
        ckpt = run.layout.train / "checkpoints" / "best.pt"
        if ckpt.exists():
            lines.append(f"Best checkpoint: {ckpt}")
    if run.layout.predictions.exists():
        lines.append(f"Predictions: {run.layout.predictions}")
    diags = diagnose(run)
    lines += ["", "## Diagnosis", ""]
    if not diags:
        lines.append("Nothing went wrong." if all(
            run.current(s).get("state") == "COMPLETED" for s in run.steps())
            else "Nothing has failed so far; steps are still queued or running.")
    for d in diags:
        lines += [f"- **{d.step}: {d.problem}**", f"  - evidence: `{d.evidence[:300]}`",
                  f"  - next: {d.action}"]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "-" if v is None else str(v)


def refresh_accounting(run: Run) -> None:
    """Fill sacct figures (CPU time, MaxRSS) for ended jobs that lack them; one call at most."""
    if run.backend_name != "slurm":
        return
    ids = [run.current(s)["job_id"] for s in run.steps()
           if run.current(s).get("final") and "total_cpu" not in run.current(s)]
    if not ids:
        return
    try:
        infos = scheduler.sacct(ids)
    except scheduler.SchedulerError:
        return
    for s in run.steps():
        rec = run.current(s)
        info = infos.get(rec["job_id"])
        if info:
            rec.update({k: v for k, v in info.extra.items() if v})
            if info.elapsed:
                rec["elapsed"] = info.elapsed
