"""Rendering each step's sbatch script from its template in ``sbatch/``.

Templates hold ``{{name}}`` placeholders. Every value that reaches a command line is quoted with
shlex. The log's path reaches its ``#SBATCH --output`` line double-quoted the way sbatch's own
parser unquotes it, with ``%`` written ``%%`` (Slurm's file name patterns), so a working folder
with spaces, non-ASCII letters, ``%`` or ``#`` works; other ``#SBATCH`` values must be one word
without shell characters and are refused otherwise. Setup lines are the one place where the user's
own shell text goes in: the user configured them to run; each runs through ``eval`` so that a
failing one ends the job with a line saying which.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from hpcpipe import packaged
from hpcpipe.config import RunConfig, train_nodes
from hpcpipe.errors import ConfigError
from hpcpipe.run.layout import RunLayout
from hpcpipe.scheduler import site, states
from hpcpipe.scheduler.base import Backend

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_SBATCH_WORD = re.compile(r"^[A-Za-z0-9_.,:@%+=/-]+$")


@dataclass
class StepResources:
    nodes: int
    ntasks_per_node: int
    cpus_per_task: int
    time: str
    mem: str | None
    gpus_per_node: int = 0
    mem_per_cpu: str | None = None
    mem_per_gpu: str | None = None


def resources(cfg: RunConfig, step: str) -> StepResources:
    """The allocation a step asks for, from its config section."""
    if step == "ingest":
        i = cfg.ingest
        # Ingest's Dask workers have one thread each (runtime: steps.ingest._ClusterOfOne).
        return _dask_resources(i.cpus, i.nodes, 1, i.time, i.mem, i.mem_per_cpu)
    if step == "features":
        c = cfg.features
        return _dask_resources(c.cpus, c.nodes, c.threads_per_worker, c.time, c.mem,
                               c.mem_per_cpu)
    if step == "train":
        t = cfg.train
        nodes, per_node = train_nodes(t)
        return StepResources(nodes, per_node, t.cpus_per_gpu, t.time, t.mem, per_node,
                             mem_per_gpu=t.mem_per_gpu)
    raise ValueError(step)


def _dask_resources(cpus: int, nodes: int, threads_per_worker: int, time: str,
                    mem: str | None, mem_per_cpu: str | None) -> StepResources:
    """A Dask step's allocation (ingest, features). One node: one task of all the CPUs, which
    runs a LocalCluster. Several: SLURMRunner, one Dask process per task; rank 0 is the
    scheduler, rank 1 the client, the others workers of ``threads_per_worker`` threads each. So
    a task per worker: the scheduler and client then hold 2 tasks' CPUs, not half of the first
    node."""
    if nodes == 1:
        return StepResources(1, 1, cpus, time, mem, mem_per_cpu=mem_per_cpu)
    per_node = -(-cpus // nodes)
    threads = min(threads_per_worker, per_node)
    tasks = max(2, per_node // threads)
    return StepResources(nodes, tasks, max(1, per_node // tasks), time, mem,
                         mem_per_cpu=mem_per_cpu)


def _sbatch_word(value: str, key: str) -> str:
    if not _SBATCH_WORD.match(value):
        raise ConfigError(
            f"{key}: {value!r} cannot go into an #SBATCH line: use only letters, digits and "
            "_.,:@%+=/- (no spaces, quotes, newlines or shell characters)")
    return value


def _sbatch_log_path(logs_dir: Path, step: str) -> str:
    """The ``--output`` value for ``logs_dir/<step>-<job id>.out``, quoted for an #SBATCH line.

    sbatch reads an #SBATCH line with its own parser (``_get_argument`` in src/sbatch/opt.c): a
    double-quoted argument may hold spaces and ``#``, and a backslash escapes the next character,
    so ``"`` is written ``\\"``. In the file name ``%`` starts a pattern (``%j``: the job id) and
    ``%%`` is a literal ``%`` (sbatch(1), filename pattern). Two things cannot work and are
    refused: a newline ends the #SBATCH line, and a backslash anywhere in the file name makes
    Slurm drop every backslash and expand no pattern, so the log would not carry the job id.
    """
    folder = str(logs_dir)
    for char, what, why in (("\n", "newline", "it would end the #SBATCH line"),
                            ("\r", "carriage return", "it would end the #SBATCH line"),
                            ("\\", "backslash", "Slurm then drops every backslash and "
                             "expands no %j pattern in the log's name")):
        if char in folder:
            raise ConfigError(
                f"logs folder: {folder!r} has a {what}, which an #SBATCH --output line cannot "
                f"take ({why}); use a logs folder without it: --set logs_dir=/some/other/folder")
    name = f"{folder.replace('%', '%%')}/{step}-%j.out"
    return '"' + name.replace('"', '\\"') + '"'


def fill(template: str, values: dict[str, str], name: str) -> str:
    """Replace ``{{key}}`` placeholders; an unknown placeholder is an error in the template."""

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise ConfigError(f"template {name} uses {{{{{key}}}}}, which hpcpipe does not know")
        return values[key]

    return _PLACEHOLDER.sub(sub, template)


def _setup_lines(lines: list[str]) -> str:
    """Each ``slurm.setup`` line, run so that its failure ends the job saying which line failed.

    ``eval`` at the top level of the script: the line runs in the job's own shell (a ``source``
    or ``module load`` changes the step's environment, a ``# comment`` stays inside the line),
    and ``||`` sees the exit code of the whole line, not of some command inside a sourced file.
    """
    if not lines:
        return "# (no setup lines configured)"
    out = []
    for i, line in enumerate(lines):
        key = f"slurm.setup[{i}]"  # quoted below: [0] is a glob pattern to bash
        out.append(
            f"eval {shlex.quote(line)} || {{ rc=$?; printf 'hpcpipe: setup line %s failed with "
            f"exit code %s: %s\\n' {shlex.quote(key)} \"$rc\" {shlex.quote(line)} >&2; exit \"$rc\"; }}")
    return "\n".join(out)


def _memory_option(res: StepResources, step: str, facts: site.SiteFacts | None) -> str | None:
    """The one memory option of a step. ``--mem-per-gpu`` needs select/cons_tres: where the
    site's facts do not say it has it, the same memory goes as ``--mem`` per node."""
    if res.mem:
        return f"--mem={_sbatch_word(res.mem, f'{step}.mem')}"
    if res.mem_per_cpu:
        return f"--mem-per-cpu={_sbatch_word(res.mem_per_cpu, f'{step}.mem_per_cpu')}"
    if res.mem_per_gpu:
        value = _sbatch_word(res.mem_per_gpu, f"{step}.mem_per_gpu")
        if facts is not None and facts.cons_tres:
            return f"--mem-per-gpu={value}"
        number, unit = (value[:-1], value[-1].upper()) if value[-1].isalpha() else (value, "")
        return f"--mem={int(number) * max(1, res.gpus_per_node)}{unit}"
    return None


def render_step(cfg: RunConfig, layout: RunLayout, step: str, backend: Backend,
                logs_dir: Path) -> str:
    """The sbatch script of ``step`` for this run, as text, in the forms the site takes (the
    facts the backend's layout check read; without them the forms every Slurm takes)."""
    res = resources(cfg, step)
    s = cfg.slurm
    facts: site.SiteFacts | None = getattr(backend, "facts", None)
    lines = []
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(s, key)
        if value:
            lines.append(f"#SBATCH --{key}={_sbatch_word(value, f'slurm.{key}')}")
    memory = _memory_option(res, step, facts)
    if memory:
        lines.append(f"#SBATCH {memory}")
    for i, opt in enumerate(s.extra_sbatch):
        lines.append(f"#SBATCH {_sbatch_word(opt, f'slurm.extra_sbatch[{i}]')}")
    values = {
        "job_name": _sbatch_word(f"{step}.{layout.run_id}", "run name"),
        "log": _sbatch_log_path(logs_dir, step),
        "nodes": str(res.nodes),
        "ntasks_per_node": str(res.ntasks_per_node),
        "cpus_per_task": str(res.cpus_per_task),
        "gpus_per_node": str(res.gpus_per_node),
        "gpu_request": site.gpu_request(facts, res.gpus_per_node),
        "time": _sbatch_word(res.time, f"{step}.time"),
        "signal_seconds": str(cfg.train.signal_seconds),
        "requeue_exit_code": str(states.REQUEUE_EXIT_CODE),
        "requeue_request": shlex.quote(str(layout.requeue_request)),
        "site_options": "\n".join(lines),
        "setup": _setup_lines(s.setup),
        "launch": (backend.launcher(step, res.nodes * res.ntasks_per_node) + " ").lstrip(),
        "python": shlex.quote(s.python or sys.executable),
        "job_module": f"{packaged.JOBS_PACKAGE}.{step}",
        "run_dir": shlex.quote(str(layout.root)),
    }
    template, where = packaged.template(step, s.templates)
    text = fill(template, values, where)
    return re.sub(r"\n{3,}", "\n\n", text)
