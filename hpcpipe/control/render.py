"""Rendering each step's sbatch script from its template in ``sbatch/``.

Templates hold ``{{name}}`` placeholders. Every value that reaches a command line is quoted with
shlex; values that reach an ``#SBATCH`` line must be one word without shell characters (sbatch does
not unquote them) and are refused otherwise. Setup lines are the one place where the user's own
shell text goes in verbatim: the user configured them to run.
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


def resources(cfg: RunConfig, step: str) -> StepResources:
    """The allocation a step asks for, from its config section."""
    if step == "ingest":
        i = cfg.ingest
        return StepResources(1, 1, i.cpus, i.time, i.mem)
    if step == "features":
        c = cfg.features
        if c.nodes == 1:
            return StepResources(1, 1, c.cpus, c.time, c.mem)
        # SLURMRunner: one Dask process per task; rank 0 is the scheduler, rank 1 the client,
        # the others workers of threads_per_worker threads each. So a task per worker: the
        # scheduler and client then hold 2 tasks' CPUs, not half of the first node.
        per_node = -(-c.cpus // c.nodes)
        threads = min(c.threads_per_worker, per_node)
        tasks = max(2, per_node // threads)
        return StepResources(c.nodes, tasks, max(1, per_node // tasks), c.time, c.mem)
    if step == "train":
        t = cfg.train
        nodes, per_node = train_nodes(t)
        return StepResources(nodes, per_node, t.cpus_per_gpu, t.time, t.mem, per_node)
    raise ValueError(step)


def _sbatch_word(value: str, key: str) -> str:
    if not _SBATCH_WORD.match(value):
        raise ConfigError(
            f"{key}: {value!r} cannot go into an #SBATCH line: use only letters, digits and "
            "_.,:@%+=/- (no spaces, quotes, newlines or shell characters)")
    return value


def fill(template: str, values: dict[str, str], name: str) -> str:
    """Replace ``{{key}}`` placeholders; an unknown placeholder is an error in the template."""

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise ConfigError(f"template {name} uses {{{{{key}}}}}, which hpcpipe does not know")
        return values[key]

    return _PLACEHOLDER.sub(sub, template)


def render_step(cfg: RunConfig, layout: RunLayout, step: str, backend: Backend,
                logs_dir: Path) -> str:
    """The sbatch script of ``step`` for this run, as text."""
    res = resources(cfg, step)
    s = cfg.slurm
    site = []
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(s, key)
        if value:
            site.append(f"#SBATCH --{key}={_sbatch_word(value, f'slurm.{key}')}")
    if res.mem:
        site.append(f"#SBATCH --mem={_sbatch_word(res.mem, f'{step}.mem')}")
    for i, opt in enumerate(s.extra_sbatch):
        site.append(f"#SBATCH {_sbatch_word(opt, f'slurm.extra_sbatch[{i}]')}")
    log = logs_dir / f"{step}-%j.out"
    values = {
        "job_name": _sbatch_word(f"{step}.{layout.run_id}", "run name"),
        "log": _sbatch_word(str(log), "logs folder"),
        "nodes": str(res.nodes),
        "ntasks_per_node": str(res.ntasks_per_node),
        "cpus_per_task": str(res.cpus_per_task),
        "gpus_per_node": str(res.gpus_per_node),
        "time": _sbatch_word(res.time, f"{step}.time"),
        "signal_seconds": str(cfg.train.signal_seconds),
        "site_options": "\n".join(site),
        "setup": "\n".join(s.setup) if s.setup else "# (no setup lines configured)",
        "launch": (backend.launcher(step, res.nodes * res.ntasks_per_node) + " ").lstrip(),
        "python": shlex.quote(s.python or sys.executable),
        "job_module": f"{packaged.JOBS_PACKAGE}.{step}",
        "run_dir": shlex.quote(str(layout.root)),
    }
    template, where = packaged.template(step, s.templates)
    text = fill(template, values, where)
    return re.sub(r"\n{3,}", "\n\n", text)
