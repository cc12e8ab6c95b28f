"""The layout's rule, enforced: control and watch never import the steps or the job runtime, and
no module of theirs imports a heavy library at import time; only hpcpipe.runtime.env reads the
allocation's SLURM_* variables."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hpcpipe"
HEAVY = ("torch", "dask", "distributed", "dask_jobqueue", "pandas", "numpy", "pyarrow",
         "transformers", "matplotlib", "isal", "tqdm")
# What control (submit, rerun, cancel) and watch (status, logs, summarize) may never reach.
FORBIDDEN = ("hpcpipe.steps", "hpcpipe.runtime", "hpcpipe.jobs")


def _modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


def _imports(path: Path, top_level_only: bool) -> list[tuple[int, str]]:
    """(line, module) of every import in the file (only those run at import time if asked)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # imports under `if TYPE_CHECKING:` never run
        nodes = [n for n in nodes if not (isinstance(n, ast.If)
                                          and "TYPE_CHECKING" in ast.dump(n.test))]
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


@pytest.mark.parametrize("layer", ["control", "watch"])
def test_control_and_watch_never_import_the_steps_or_the_runtime(layer: str) -> None:
    bad = [f"{p.relative_to(PACKAGE.parent)}:{line} imports {mod}"
           for p in _modules(layer) for line, mod in _imports(p, top_level_only=False)
           if mod.startswith(FORBIDDEN)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", ["control", "watch", "run", "scheduler"])
def test_no_heavy_library_at_import_time(layer: str) -> None:
    bad = [f"{p.relative_to(PACKAGE.parent)}:{line} imports {mod}"
           for p in _modules(layer) for line, mod in _imports(p, top_level_only=True)
           if mod.split(".")[0] in HEAVY]
    assert not bad, "\n".join(bad)


def test_importing_every_control_and_watch_module_loads_nothing_heavy() -> None:
    mods = [".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
            for layer in ("control", "watch", "run", "scheduler") for p in _modules(layer)]
    code = (f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
            f"import hpcpipe.cli\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", out


def test_only_the_job_environment_reads_slurm_variables() -> None:
    readers = sorted(str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                     if any(re.fullmatch(r"SLURM_[A-Z_]*", c) for c in _strings(p)))
    # The local runner removes SLURM_* from its children's environment (it reads none).
    assert readers == ["hpcpipe/runtime/env.py", "hpcpipe/scheduler/local.py"], readers
    assert '"SLURM_"' in (PACKAGE / "scheduler" / "local.py").read_text()


def _strings(path: Path) -> list[str]:
    """The file's string constants other than docstrings: a variable read by name is one.
    (Shell text such as "$SLURM_CPUS_PER_TASK" in a rendered script is not a read here.)"""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]
