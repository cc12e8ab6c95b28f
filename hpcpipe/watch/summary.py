"""``hpcpipe summarize``: one report per run, and a diagnosis of what went wrong.

The report reads the run's state file (job states, sacct figures cached there), its metrics file
and, for steps that did not complete, their logs, streamed line by line so a log of gigabytes takes
constant memory. Each diagnosis names the evidence line and the next thing to do.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcpipe.config import load_config
from hpcpipe.errors import ConfigError
from hpcpipe.run import gpu_samples
from hpcpipe.run.folder import Run
from hpcpipe.run.metrics import read_metrics
from hpcpipe.run.provenance import RECORDS, out_of_date
from hpcpipe.run.record import JobRecord
from hpcpipe.scheduler import get_backend
from hpcpipe.users import user_name


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


#: Bytes that every line worth a closer look contains one of; checked on whole chunks at C speed.
_TRIGGER = re.compile(rb"rror|ERROR|\*\*\*|emory|Traceback|File \"|NCCL|OOM|oom|equeu|Killed|"
                      rb"Exception|Interrupt|xit")
_CHUNK = 1 << 22
_MAX_LINE = 1 << 16


def _candidate_lines(path: Path) -> Iterator[bytes]:
    """The lines of a log that contain a trigger, in order, in bounded memory.

    A line is what is left after the last carriage return (tqdm's redraws before it are never
    looked at, which is most of a progress-heavy log). The file is read in chunks, never whole,
    and a line that never ends is cut to its last 64 KiB.
    """
    with open(path, "rb") as f:
        carry = b""
        while True:
            data = f.read(_CHUNK)
            buf = carry + data
            if not data:
                end = len(buf)
            else:
                end = buf.rfind(b"\n") + 1
            body, carry = buf[:end], buf[end:]
            if len(carry) > _MAX_LINE:
                cut = carry.rfind(b"\r")
                carry = carry[cut:] if cut >= len(carry) - _MAX_LINE else carry[-_MAX_LINE:]
            if b"\r" in body:
                # keep what each line shows last: the text after its last carriage return
                body = b"\n".join(line[line.rfind(b"\r") + 1:]
                                  for line in body.replace(b"\r\n", b"\n").split(b"\n"))
            pos = 0
            for m in _TRIGGER.finditer(body):
                if m.start() < pos:
                    continue
                start = body.rfind(b"\n", 0, m.start()) + 1
                stop = body.find(b"\n", m.end())
                stop = len(body) if stop < 0 else stop
                yield body[start:stop]
                pos = stop
            if not data:
                return


def scan_log(path: Path) -> dict[str, Any]:
    """One streamed pass over a log: the first line matching each pattern and the last traceback.

    Memory stays constant however large the log (chunks of 4 MiB).
    """
    found: dict[str, Any] = {}
    in_tb = False
    last_frame = ""
    if not path.is_file():
        return found
    for raw in _candidate_lines(path):
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
        epochs = run.load_config().train.epochs
    except Exception:  # noqa: BLE001 - the report must not fail on a damaged config
        epochs = None
    if not evals:
        return "; it had not finished an epoch"
    return f"; it reached epoch {evals[-1].get('epoch', 0) + 1}/{epochs or '?'}"


def diagnose(run: Run) -> list[Diagnosis]:
    """A diagnosis for each step whose current job did not complete.

    A job still queued or running gets one only when something already happened to it: it was
    requeued (by its own USR2 handler before the time limit, or by an admin), or it waits on a
    dependency that can never be satisfied.
    """
    out = []
    for step in run.steps():
        d = diagnose_step(run, step)
        if d is not None:
            out.append(d)
    for step, why in out_of_date(run.layout).items():
        rec = run.current(step)
        if rec is None or rec.active or not why.startswith("out of date"):
            continue
        out.append(Diagnosis(step, f"out of date ({why.removeprefix('out of date: ')})",
                             f"{RECORDS[step][0]}: {why}",
                             f"`hpcpipe rerun {step} {run.run_id}` recomputes it from the "
                             "current input"))
    never = [s for s in run.state.planned if s not in run.state.steps]
    if never:
        out.append(_never_submitted(run, never))
    loses = _model_loses(run)
    if loses is not None:  # the first thing to say when it happens
        out.insert(0, loses)
    return out


def _never_submitted(run: Run, never: list[str]) -> Diagnosis:
    """Steps a submit set out to queue that never reached the scheduler (it failed or was
    interrupted): the run is incomplete even if every recorded job completes."""
    why = next((e["text"] for e in reversed(run.state.events)
                if "submission of" in e["text"] or "was killed" in e["text"]),
               "the submission stopped before these steps were queued")
    first = never[0]
    return Diagnosis(first, f"never submitted: {', '.join(never)} (the submit failed or was "
                     "interrupted)", why,
                     f"`hpcpipe rerun {first}` queues it (and the steps after it) behind what "
                     "is still running")


def diagnose_step(run: Run, step: str) -> Diagnosis | None:
    """The diagnosis of one step's current job, or None when there is nothing to say."""
    rec = run.current(step)
    if rec is None:
        return None
    state = rec.state
    if rec.reason == "DependencyNeverSatisfied":
        return _dependency_never_satisfied(run, step, rec)
    if state == "COMPLETED":
        return None
    if rec.active:
        if rec.restarts:
            return _requeued(run, step, rec)
        return _stuck(step, rec) if rec.state == "PENDING" else None
    found = scan_log(Path(rec.log))
    if "cuda_oom" in found:
        return Diagnosis(step, "CUDA out of memory", found["cuda_oom"],
                         "lower train.batch_size (raise train.grad_accum to keep the global batch) "
                         f"or turn on train.grad_checkpointing, then `hpcpipe rerun {step}`")
    if state == "OUT_OF_MEMORY" or "host_oom" in found:
        peak = f", peak {_bytes(rec.max_rss_bytes)}" if rec.max_rss_bytes else ""
        return Diagnosis(step, "out of host memory (killed by Slurm/the kernel)",
                         found.get("host_oom", f"sacct state {state}"),
                         f"raise {step}.mem (requested {_requested_mem(run, step, rec)}{peak}) "
                         f"and `hpcpipe rerun {step} --set {step}.mem=<more>`")
    if "nccl" in found:
        return Diagnosis(step, "NCCL error or collective timeout", found["nccl"],
                         "check the nodes' network/GPUs (`sinfo -R`), exclude a bad node with "
                         "slurm.extra_sbatch: [--exclude=NODE], then `hpcpipe rerun "
                         f"{step}`: it resumes from the last checkpoint")
    if state == "TIMEOUT" or "timeout" in found:
        requeue = ""
        if step == "train":
            requeue = (" (train.signal_seconds > 0 makes it checkpoint and requeue itself before "
                       "the limit; here that did not happen)")
        return Diagnosis(step, "hit its time limit (TIMEOUT)",
                         found.get("timeout", f"state TIMEOUT after {rec.elapsed}"),
                         f"raise {step}.time (now {rec.time_limit or '?'}) and `hpcpipe "
                         f"rerun {step} --set {step}.time=<more>`: it continues from where it "
                         f"stopped{_progress(run, step)}{requeue}")
    if state == "PREEMPTED" or "preempted" in found:
        return Diagnosis(step, "preempted", found.get("preempted", "state PREEMPTED"),
                         f"`hpcpipe rerun {step}` resumes it (it requeues itself when --requeue "
                         "is allowed on the partition)")
    if state == "NODE_FAIL" or "node_fail" in found:
        return Diagnosis(step, "a node failed (NODE_FAIL)",
                         found.get("node_fail", f"state NODE_FAIL on {rec.nodes}"),
                         f"`hpcpipe rerun {step}` (add slurm.extra_sbatch: "
                         f"[--exclude={rec.nodes or 'NODE'}] if it repeats)")
    if state == "CANCELLED":
        by = rec.cancelled_by
        by = f" by {user_name(by)}" if by else ""
        ran = "" if rec.start else " before it started"
        action = f"`hpcpipe rerun {step}` submits it again" if ran else \
            f"`hpcpipe rerun {step}` resumes it in place{_progress(run, step)}"
        evidence = found.get("cancelled", f"job {rec.job_id} CANCELLED{by}")
        return Diagnosis(step, f"CANCELLED{by}{ran}", evidence, action)
    if "traceback" in found:
        frame, msg = found["traceback"]
        kind = msg.split(":", 1)[0].rsplit(".", 1)[-1]
        return Diagnosis(step, f"Python exception {kind}" + (f" in {frame}" if frame else ""),
                         f"{msg} (last frame: {frame})" if frame else msg,
                         f"fix the cause shown, then `hpcpipe rerun {step}` "
                         f"(full traceback: `hpcpipe logs {step} {run.run_id}`)")
    return Diagnosis(step, f"ended {state} (exit {rec.exit_code or '?'})",
                     "no known failure pattern in the log",
                     f"read the log: `hpcpipe logs {step} {run.run_id}`")


def _dependency_never_satisfied(run: Run, step: str, rec: JobRecord) -> Diagnosis:
    """Name the upstream step that failed (not one that merely never ran) and its evidence."""
    ups = run.steps()[: run.steps().index(step)]
    failed = [s for s in ups if (r := run.current(s)) is not None and not r.completed]
    root = next((s for s in failed if run.job(s).reason != "DependencyNeverSatisfied"), None)
    who = "Slurm" if run.backend_name == "slurm" else "the local runner"
    never = f"cancelled by {who} before it started" if rec.state == "CANCELLED" \
        else "pending forever"
    if root is None:
        return Diagnosis(step, f"DependencyNeverSatisfied: never ran ({never})",
                         f"Slurm reason DependencyNeverSatisfied on job {rec.job_id}; no "
                         "failed upstream step is recorded in this run",
                         f"`hpcpipe rerun {step}`")
    up = run.job(root)
    cause = diagnose_step(run, root)
    evidence = f"upstream {root} (job {up.job_id}) ended {up.state}"
    if cause is not None:
        evidence += f": {cause.evidence}"
    fix = "" if up.state == "CANCELLED" else f"fix {root} first (see its diagnosis), then "
    return Diagnosis(step, f"DependencyNeverSatisfied: never ran, upstream step {root} ended "
                     f"{up.state} ({never})", evidence,
                     f"{fix}`hpcpipe rerun {root}`: the steps after it are resubmitted behind it")


# Pending reasons after which a job does not start by waiting: (prefix of Slurm's reason,
# the problem, what to do). The others (Resources, Priority, Dependency, BeginTime...) pass.
_STUCK = [
    ("PartitionTimeLimit", "its time limit is above the partition's MaxTime: it will never start",
     "lower {step}.time below the partition's limit (`sinfo -o '%P %l'`) or pick another "
     "partition: `hpcpipe rerun {step} --cancel-first --set {step}.time=...`"),
    ("PartitionNodeLimit", "it asks for more nodes than the partition allows: it will never start",
     "lower the node count or pick another partition, then `hpcpipe rerun {step} "
     "--cancel-first --set ...`"),
    ("ReqNodeNotAvail", "nodes it needs are down, drained or reserved: it waits until they return",
     "wait, or avoid them with slurm.extra_sbatch: [--exclude=NODES] and `hpcpipe rerun {step} "
     "--cancel-first` (`sinfo -R` says why the nodes are out)"),
    ("JobHeldUser", "it is held (by a user): it will not start until released",
     "`scontrol release {job}`"),
    ("JobHeldAdmin", "it is held by an administrator: it will not start until released",
     "ask your cluster's administrators why job {job} is held"),
    ("QOSMaxWallDurationPerJobLimit", "its time limit is above the QOS's limit: it will never "
     "start", "lower {step}.time or use another slurm.qos, then `hpcpipe rerun {step} "
     "--cancel-first --set {step}.time=...`"),
    ("AssocMaxWallDurationPerJobLimit", "its time limit is above your account's limit: it will "
     "never start", "lower {step}.time, then `hpcpipe rerun {step} --cancel-first --set "
     "{step}.time=...`"),
    ("BadConstraints", "it asks for a node feature no node has: it will never start",
     "fix slurm.constraint, then `hpcpipe rerun {step} --cancel-first`"),
    ("InvalidAccount", "its account is not valid: it will never start",
     "fix slurm.account, then `hpcpipe rerun {step} --cancel-first`"),
]


def _stuck(step: str, rec: JobRecord) -> Diagnosis | None:
    """A pending job that waiting alone will not start, from the scheduler's pending reason."""
    for reason, problem, action in _STUCK:
        if rec.reason.startswith(reason):
            return Diagnosis(step, f"pending: {problem}",
                             f"job {rec.job_id} PENDING, reason {rec.reason}",
                             action.format(step=step, job=rec.job_id))
    return None


def _model_loses(run: Run) -> Diagnosis | None:
    """The model's validation SMAPE is not better than every baseline's (whole counts,
    LightGBM included); for runs of an older hpcpipe, than the better naive baseline's."""
    metrics = read_metrics(run.layout.metrics)
    summaries = [m for m in metrics if m.get("step") == "train" and m.get("kind") == "summary"
                 and isinstance(m.get("baselines"), dict)]
    if summaries:
        summ = summaries[-1]
        losers = _beaten_by(summ)
        if not losers:
            return None
        name, smape = losers[0]
        return Diagnosis("train", f"the model does not beat {_BASELINE_NAMES.get(name, name)}"
                         f"{' (and ' + str(len(losers) - 1) + ' more)' if len(losers) > 1 else ''}"
                         ": a cheaper forecast is at least as good",
                         f"best validation SMAPE {_fmt(summ.get('best_val_smape'))} (epoch "
                         f"{summ.get('best_epoch')}, chosen on the inner weeks) vs {_fmt(smape)} "
                         f"for {name}, whole counts on the same rows",
                         "train longer (train.epochs), try a lower train.lr or fine-tune the "
                         "encoder (train.freeze_encoder=false on GPUs), then `hpcpipe rerun "
                         "train --fresh`; until it wins, the baseline is the better forecast")
    evals = [m for m in metrics if m.get("step") == "train" and m.get("kind") == "eval"]
    if not evals:
        return None
    best = min(evals, key=lambda e: _num(e.get("val_smape"), float("inf")))
    model = _num(best.get("val_smape"), float("nan"))
    base = min(_num(best.get("baseline_same_smape"), 1e9),
               _num(best.get("baseline_roll4_smape"), 1e9))
    if model < base:
        return None
    return Diagnosis("train", "the model does not beat the naive baseline: its predictions are "
                     "no better than repeating recent weeks",
                     f"best validation SMAPE {_fmt(model)} (epoch {best.get('epoch')}) vs "
                     f"{_fmt(base)} for the better naive baseline",
                     "train longer (train.epochs), try a lower train.lr or fine-tune the encoder "
                     "(train.freeze_encoder=false on GPUs), then `hpcpipe rerun train --fresh`")


def _num(v: Any, default: float) -> float:
    return float(v) if isinstance(v, (int, float)) and v == v else default


def _requeued(run: Run, step: str, rec: JobRecord) -> Diagnosis:
    """A job that was requeued and is queued or running again."""
    n = rec.restarts
    found = scan_log(Path(rec.log))
    line = found.get("requeue", "")
    if re.search(r"SIGUSR2", line):
        return Diagnosis(step, f"requeued {n}x by itself before its time limit (USR2 warning), "
                         f"now {rec.state}", line,
                         "nothing to do: it resumes from its checkpoint. To finish in one "
                         f"allocation raise {step}.time (now {rec.time_limit or '?'})"
                         f"{_progress(run, step)}")
    cause = found.get("preempted") or found.get("node_fail") or line
    return Diagnosis(step, f"requeued {n}x (by Slurm or an admin), now {rec.state}",
                     cause or f"restart count {n} on job {rec.job_id}",
                     "nothing to do: the same job id runs again and resumes its work "
                     f"(`hpcpipe logs {step} -f` follows it)")


def _requested_mem(run: Run, step: str, rec: JobRecord) -> str:
    """What the step asked for: sacct's ReqMem, else the run's config, else the site default."""
    if rec.req_mem:
        return rec.req_mem
    try:
        cfg = load_config(run.layout.config)
    except (OSError, ConfigError):
        return "the partition's default"
    return getattr(cfg, step).mem or "the partition's default"


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


def _queue_wait(rec: JobRecord) -> str:
    try:
        sub = dt.datetime.fromisoformat(rec.submitted)
        start = dt.datetime.fromisoformat(rec.start)
    except (KeyError, ValueError, TypeError):
        return "-"
    secs = max(0, int((start - sub).total_seconds()))
    return f"{secs // 60}m{secs % 60:02d}s"


def build_report(run: Run) -> str:
    """The markdown report (also written to ``<run>/summary.md``)."""
    metrics = read_metrics(run.layout.metrics)
    lines = [f"# hpcpipe run {run.run_id}", "", f"backend: {run.backend_name}, created "
             f"{run.state.created or '?'}", "",
             "| step | job | state | elapsed | queue wait | CPU eff. | max RSS / requested | "
             "throughput | earlier jobs |", "|---|---|---|---|---|---|---|---|---|"]
    for step in run.steps():
        rec = run.job(step)
        eff = "-"
        total, elapsed = _seconds(rec.total_cpu), _seconds(rec.elapsed)
        cpus = int(rec.alloc_cpus or 0)
        if total is not None and elapsed and cpus:
            eff = f"{100 * total / (elapsed * cpus):.0f}% of {cpus}"
        mem = "-"
        if rec.max_rss_bytes:
            mem = f"{_bytes(rec.max_rss_bytes)} / {rec.req_mem or '?'}"
        summ = [m for m in metrics if m.get("step") == step and m.get("kind") == "summary"]
        thr = "-"
        if summ:
            s = summ[-1]
            if isinstance(s.get("rows_per_s"), (int, float)):
                thr = f"{s['rows_per_s']:,.0f} rows/s"
            elif isinstance(s.get("samples_per_s"), (int, float)):
                thr = f"{s['samples_per_s']:,.1f} samples/s"
        earlier = ", ".join(f"{j.job_id} ({j.state})" for j in run.jobs(step)[:-1])
        lines.append(f"| {step} | {rec.job_id} | {rec.state} | "
                     f"{rec.elapsed or '-'} | {_queue_wait(rec)} | {eff} | {mem} | {thr} | "
                     f"{earlier or '-'} |")
    lines += ["", "## Step results", ""]
    for step in run.steps():
        summ = [m for m in metrics if m.get("step") == step and m.get("kind") == "summary"]
        if summ:
            s = {k: v for k, v in summ[-1].items() if k not in ("time", "step", "kind")}
            lines.append(f"- **{step}**: " + ", ".join(f"{k}={_fmt(v)}" for k, v in s.items()))
    lines += _training_section(run, metrics)
    if "train" in run.steps():
        lines += gpu_section(run, metrics)
    if run.layout.predictions.exists():
        lines.append(f"Predictions: {run.layout.predictions}")
    diags = diagnose(run)
    lines += ["", "## Diagnosis", ""]
    if not diags:
        lines.append("Nothing went wrong." if all(
            run.job(s).completed for s in run.steps())
            else "Nothing has failed so far; steps are still queued or running.")
    for d in diags:
        lines += [f"- **{d.step}: {d.problem}**", f"  - evidence: `{d.evidence[:600]}`",
                  f"  - next: {d.action}"]
    return "\n".join(lines) + "\n"


#: Names of the baselines in the report.
_BASELINE_NAMES = {"same_week": "same as this week", "roll_mean_4": "roll_mean_4",
                   "roll_mean_12": "roll_mean_12",
                   "roll_mean_4_poisson": "roll_mean_4, SMAPE-optimal Poisson count",
                   "lightgbm": "LightGBM (L1 on log1p)",
                   "lightgbm_poisson": "LightGBM (Poisson, SMAPE-optimal count)",
                   "lightgbm_poisson_history": "LightGBM (Poisson, + 52 weekly counts)"}


def _training_section(run: Run, metrics: list[dict[str, Any]]) -> list[str]:
    """The headline (a loss said first), the per-epoch table and, for runs that wrote it, the
    model next to every baseline and the floor on the same validation rows, in whole counts."""
    evals = [m for m in metrics if m.get("step") == "train" and m.get("kind") == "eval"]
    if not evals:
        return []
    summaries = [m for m in metrics if m.get("step") == "train" and m.get("kind") == "summary"]
    summ = summaries[-1] if summaries and isinstance(summaries[-1].get("baselines"), dict) \
        else None
    lines = ["", "## Training", ""]
    if summ is None:  # a run from before the inner split and the whole-count baselines
        lines += [_old_headline(evals)]
    else:
        lines += [_headline(summ)]
    losses = {}
    for m in metrics:
        if m.get("step") == "train" and m.get("kind") == "train":
            losses[m.get("epoch")] = m.get("loss")
    inner = any("inner_smape" in e for e in evals)
    lines += ["", "| epoch | train loss | " + ("inner SMAPE (chooses) | " if inner else "")
              + "val MAE | val SMAPE | SMAPE same-as-this-week | SMAPE roll_mean_4 | "
              "vs strongest naive |", "|---|---|" + ("---|" if inner else "") + "---|---|---|---|---|"]
    for e in evals:
        lines.append(
            f"| {e.get('epoch')} | {_fmt(losses.get(e.get('epoch')))} | "
            + (f"{_fmt(e.get('inner_smape'))} | " if inner else "")
            + f"{_fmt(e.get('val_mae'))} | {_fmt(e.get('val_smape'))} | "
            f"{_fmt(e.get('baseline_same_smape'))} | {_fmt(e.get('baseline_roll4_smape'))} | "
            f"{_fmt(e.get('improvement_pct'))}% |")
    if summ is not None:
        lines += _scores_table(summ)
    ckpt = run.layout.train / "checkpoints" / "best.pt"
    if ckpt.exists():
        lines.append(f"Best checkpoint: {ckpt}")
    return lines


def gpu_section(run: Run, metrics: list[dict[str, Any]]) -> list[str]:
    """GPU use of the train step, each figure labelled by its source: the job's NVML samples
    (per GPU: mean utilisation, peak memory, idle GPUs; requeued starts), the loader's data-wait
    fraction (train metrics) and, where the site accounts it, Slurm's gres/gpuutil and
    gres/gpumem (sacct). One line where there is no GPU record at all."""
    records = gpu_samples.read_samples(run.layout.train)
    waits = [m["data_wait_frac"] for m in metrics
             if m.get("step") == "train" and m.get("kind") == "train"
             and isinstance(m.get("data_wait_frac"), (int, float))]
    wait = (f"the training loop waited for data {100 * sum(waits) / len(waits):.0f}% of its "
            f"time (train metrics, mean of {len(waits)} log intervals)") if waits else ""
    accounted = [rec for rec in run.jobs("train") if rec.gpu_util_ave or rec.gpu_util_max
                 or rec.gpu_mem_max]
    if not records and not accounted:
        return ["", "GPU use: none recorded (no GPU samples in train/gpu/ and no GPU accounting "
                "in sacct: the step trained on CPU, or nvidia-ml-py is not installed)"
                + (f"; {wait}" if wait else "") + "."]
    lines = ["", "## GPU use", ""]
    if records:
        gpus = gpu_samples.summarize(records)
        starts = len({r.get("restart", 0) for r in records})
        lines += [f"NVML samples of the train job ({len(records)} samples, {starts} start(s) of "
                  "the job):", "", "| GPU | samples | mean utilisation | peak memory | idle |",
                  "|---|---|---|---|---|"]
        for g in gpus:
            total = f" of {_bytes(g['mem_total'])}" if g.get("mem_total") else ""
            lines.append(f"| {g['host']}:{g['index']} ({g['name']}) | {g['samples']} | "
                         f"{g['util_mean']:.0f}% | {_bytes(g['mem_peak'])}{total} | "
                         f"{'yes' if g['idle'] else 'no'} |")
        idle = [f"{g['host']}:{g['index']}" for g in gpus if g["idle"]]
        lines += ["", f"Idle GPUs (mean utilisation under 5%): {', '.join(idle) or 'none'}."]
    else:
        lines.append("No NVML samples (nvidia-ml-py absent on the nodes, or NVML did not start).")
    if wait:
        lines.append(f"Data wait: {wait}.")
    for rec in accounted:
        parts = []
        if rec.gpu_util_ave:
            parts.append(f"mean utilisation {float(rec.gpu_util_ave):.0f}%")
        if rec.gpu_util_max:
            parts.append(f"peak utilisation {float(rec.gpu_util_max):.0f}%")
        if rec.gpu_mem_max:
            parts.append(f"peak memory {_bytes(rec.gpu_mem_max)}")
        lines.append(f"Slurm accounting (sacct gres/gpuutil, gres/gpumem; per task, summed over "
                     f"the node's GPUs from Slurm 24.05), job {rec.job_id}: {', '.join(parts)}.")
    return lines


def _headline(summ: dict[str, Any]) -> str:
    """"validation SMAPE X vs Y for the strongest baseline (<name>, whole counts): Z% better",
    or, when any baseline (LightGBM included) is at least as good, that the model loses."""
    model = _num(summ.get("best_val_smape"), float("nan"))
    naive = str(summ.get("strongest_baseline"))
    naive_smape = _num(summ.get("best_baseline_smape"), float("nan"))
    pct = _num(summ.get("improvement_pct"), float("nan"))
    chosen = (f"epoch {summ.get('best_epoch')}, chosen on the {summ.get('inner_weeks')} inner "
              "weeks held out of training")
    losers = _beaten_by(summ)
    if losers:
        name, smape = losers[0]
        return (f"**The model loses to {_BASELINE_NAMES.get(name, name)}**: validation SMAPE "
                f"{_fmt(model)} vs {_fmt(smape)} (whole counts; "
                f"{_fmt(100 * (model - smape) / smape)}% worse; {len(losers)} baseline(s) at "
                f"least as good). Strongest naive baseline: {_BASELINE_NAMES.get(naive, naive)} "
                f"{_fmt(naive_smape)}. ({chosen})")
    head = (f"Validation SMAPE {_fmt(model)} vs {_fmt(naive_smape)} for the strongest baseline "
            f"({_BASELINE_NAMES.get(naive, naive)}, whole counts): {_fmt(pct)}% better ({chosen})")
    lgb = (summ.get("baselines") or {}).get("lightgbm_poisson")
    if isinstance(lgb, dict):
        head += f"; LightGBM (Poisson) {_fmt(lgb.get('smape'))}"
    return head + "."


def _beaten_by(summ: dict[str, Any]) -> list[tuple[str, float]]:
    """Baselines whose validation SMAPE is at most the model's, best first."""
    model = _num(summ.get("best_val_smape"), float("nan"))
    out = [(name, _num(s.get("smape"), float("inf")))
           for name, s in (summ.get("baselines") or {}).items() if isinstance(s, dict)]
    return sorted([(n, v) for n, v in out if not model < v], key=lambda nv: nv[1])


def _scores_table(summ: dict[str, Any]) -> list[str]:
    rows = [("model (best epoch)", summ.get("model"))]
    rows += [(_BASELINE_NAMES.get(k, k), v) for k, v in (summ.get("baselines") or {}).items()]
    if isinstance(summ.get("floor"), dict):
        rows.append(("floor: generator's expected count", summ["floor"]))
    first = next((v for _, v in rows if isinstance(v, dict)), {}) or {}
    lines = ["", f"Validation rows ({first.get('rows', '?')}, "
             f"{_fmt(100 * _num(first.get('zero_share'), float('nan')))}% with target 0), every "
             "forecast a whole count:", "",
             "| forecast | SMAPE | SMAPE target=0 | SMAPE target>0 | MAE | MAE log1p | "
             "RMSE log1p |", "|---|---|---|---|---|---|---|"]
    for name, s in rows:
        if isinstance(s, dict):
            lines.append(f"| {name} | {_fmt(s.get('smape'))} | {_fmt(s.get('smape_zero'))} | "
                         f"{_fmt(s.get('smape_nonzero'))} | {_fmt(s.get('mae'))} | "
                         f"{_fmt(s.get('mae_log1p'))} | {_fmt(s.get('rmse_log1p'))} |")
    lines.append("")
    gap = summ.get("gap_closed_pct")
    if isinstance(gap, (int, float)):
        ci = summ.get("gap_closed_interval")
        noise = (f" (95% paired bootstrap interval {_fmt(ci.get('low'))}-"
                 f"{_fmt(ci.get('high'))}%)" if isinstance(ci, dict) else "")
        lines.append(f"Of the gap from rounded roll_mean_4 to the floor, the model closes "
                     f"{_fmt(float(gap))}%{noise}.")
    every = str(summ.get("strongest_any"))
    versus = (summ.get("versus_baselines") or {}).get(every)
    if isinstance(versus, dict):
        lines.append(f"Model minus {_BASELINE_NAMES.get(every, every)}: SMAPE "
                     f"{_fmt(versus.get('diff'))}, 95% paired bootstrap interval "
                     f"[{_fmt(versus.get('low'))}, {_fmt(versus.get('high'))}] (beaten beyond "
                     "the noise only where the whole interval is below 0).")
    for note in summ.get("eval_notes") or []:
        lines.append(f"Note: {note}.")
    return lines


def _old_headline(evals: list[dict[str, Any]]) -> str:
    best = min(evals, key=lambda e: _num(e.get("val_smape"), float("inf")))
    base = min(_num(best.get("baseline_same_smape"), 1e9),
               _num(best.get("baseline_roll4_smape"), 1e9))
    pct = _num(best.get("improvement_pct"), float("nan"))
    margin = (f"{_fmt(pct)}% better" if pct > 0
              else f"{_fmt(-pct)}% WORSE: the model loses to the baseline" if pct <= 0
              else "no valid score")
    return (f"Best epoch {best.get('epoch')}: validation SMAPE {_fmt(best.get('val_smape'))} "
            f"vs {_fmt(base)} for the better naive baseline (not rounded to whole counts, and "
            f"the epoch chosen on these rows: a run of an older hpcpipe), {margin}.")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "-" if v is None else str(v)


def refresh_accounting(run: Run) -> None:
    """Fill sacct figures (CPU time, MaxRSS, requested memory, exit code) for ended jobs; one
    sacct call at most. Accounting trails the controller by a moment (right after a job ends
    slurmdbd may still show a partial record), so a job is asked about until sacct shows it ended.
    """
    if run.backend_name != "slurm":
        return
    recs = [r for s in run.steps() if (r := run.current(s)) is not None]
    ids = [r.job_id for r in recs if r.final and not r.accounted]
    if not ids:
        return
    infos = get_backend(run.backend_name, run.layout.root).accounting(ids)
    for rec in recs:
        info = infos.get(rec.job_id)
        if info is None or not info.terminal:
            continue
        for key, value in info.extra.items():
            if value and hasattr(rec, key):
                setattr(rec, key, value)
        for key in ("elapsed", "exit_code", "time_limit"):
            if getattr(info, key):
                setattr(rec, key, getattr(info, key))
        rec.accounted = bool(info.end)
