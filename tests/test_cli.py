"""The command line through click's CliRunner and the installed entry point."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hpcpipe.cli import main
from hpcpipe.run.folder import Run
from hpcpipe.scheduler.local import LocalBackend

HEAVY = ("torch", "dask", "distributed", "pandas", "pyarrow", "transformers", "numpy")


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((f"{prefix}{name}", cmd))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, f"{prefix}{name} ")
    return out


@pytest.mark.parametrize(("name", "cmd"), _commands(main))
def test_every_command_has_help(name: str, cmd: click.Command) -> None:
    assert cmd.help and len(cmd.help.strip()) > 20, f"`hpcpipe {name}` has no help text"
    result = CliRunner().invoke(main, [*name.split(), "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
    for param in cmd.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"`hpcpipe {name}` option {param.opts} has no help"


def test_console_script_and_module_entry_points() -> None:
    for cmd in (["hpcpipe", "--help"], [sys.executable, "-m", "hpcpipe", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert "hpcpipe submit --cpus 32 --gpus 2" in out


def _local_run(tmp_path: Path,
               body: str = "echo hello; printf 'it: 10%%\\rit: 50%%\\rit: 100%%\\n'") -> Run:
    runs = tmp_path / "runs"
    run = Run.create(runs, "run-test", "local", tmp_path / "logs")
    backend = LocalBackend(run.layout.root)
    script = run.layout.scripts / "ingest.sbatch"
    script.parent.mkdir(parents=True)
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/logs/run-test/ingest-%j.out\n"
                      f"{body}\n")
    job = backend.submit(script, [])
    run.add_job("ingest", job, [], script)
    run.save()
    return run


def _wait_done(runs: Path, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = CliRunner().invoke(main, ["status", "--json", "--runs-dir", str(runs)]).output
        if json.loads(out)["steps"][0]["state"] in ("COMPLETED", "FAILED"):
            return
        time.sleep(0.2)
    raise AssertionError("job did not end")


def test_status_logs_and_runs_on_a_local_run(tmp_path: Path) -> None:
    run = _local_run(tmp_path)
    runs = tmp_path / "runs"
    _wait_done(runs)
    result = CliRunner().invoke(main, ["status", "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    row = [line for line in result.output.splitlines() if line.startswith("ingest")][0]
    assert run.current("ingest").job_id in row and "COMPLETED" in row
    # the ended state is cached in the state file
    assert Run.open(runs).current("ingest").final is True
    logs = CliRunner().invoke(main, ["logs", "ingest", "--runs-dir", str(runs)])
    assert logs.output.splitlines() == ["hello", "it: 100%"]
    grep = CliRunner().invoke(main, ["logs", "ingest", "--grep", "hel+o", "--runs-dir", str(runs)])
    assert grep.output.splitlines() == ["hello"]
    listing = CliRunner().invoke(main, ["runs", "--runs-dir", str(runs)])
    assert "run-test" in listing.output and "ingest:COMPLETED" in listing.output


def test_logs_follow_ends_when_the_job_ends(tmp_path: Path) -> None:
    _local_run(tmp_path, "for i in 1 2 3; do echo line $i; sleep 0.5; done")
    result = CliRunner().invoke(main, ["logs", "ingest", "-f", "--runs-dir",
                                       str(tmp_path / "runs")])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [x for x in lines if x.startswith("line")] == ["line 1", "line 2", "line 3"]
    assert "ended: COMPLETED" in lines[-1]


def test_errors_are_messages_not_tracebacks(tmp_path: Path) -> None:
    runs = str(tmp_path / "runs")
    for args, message in [
        (["status", "--runs-dir", runs], "no runs in"),
        (["logs", "train", "nope", "--runs-dir", runs], "no run 'nope'"),
        (["submit", "--local", "--set", "train.epoch=2", "--runs-dir", runs], "did you mean"),
        (["submit", "--local", "--time", "2h", "--runs-dir", runs], "not a Slurm time limit"),
        (["submit", "--local", "--set", f"data.reviews=[{tmp_path}/none.jsonl]", "--runs-dir",
          runs], "does not exist"),
        (["submit", "--local", "--steps", "features,train", "--runs-dir", runs],
         "a new run starts at ingest"),
    ]:
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0
        assert message in result.output, result.output
        assert "Traceback" not in result.output


def test_status_and_help_import_no_heavy_library(tmp_path: Path) -> None:
    _local_run(tmp_path, "true")
    code = (
        "import sys\nfrom hpcpipe.cli import main\n"
        "for args in (['--help'], ['status', '--runs-dir', sys.argv[1]]):\n"
        "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "runs")],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_concurrent_commands_on_one_run_are_refused(tmp_path: Path) -> None:
    run = _local_run(tmp_path, "true")
    with run.lock("rerun"):
        result = CliRunner().invoke(main, ["cancel", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code != 0 and "is busy" in result.output and "hpcpipe rerun" in \
        result.output


def test_metrics_fields_cannot_overwrite_the_step_name(tmp_path: Path) -> None:
    from hpcpipe.run.metrics import MetricsWriter, read_metrics

    writer = MetricsWriter(tmp_path / "m.jsonl", "train", job_id="7")
    with pytest.raises(ValueError, match="reserved"):
        writer.write("train", step=3)
    writer.write("train", global_step=3, loss=0.5)
    assert read_metrics(tmp_path / "m.jsonl") == [
        {**read_metrics(tmp_path / "m.jsonl")[0], "step": "train", "job_id": "7", "kind": "train",
         "global_step": 3, "loss": 0.5}]


def test_summarize_plot_writes_a_png_of_the_curves(tmp_path: Path) -> None:
    from hpcpipe.run.metrics import MetricsWriter

    run = _local_run(tmp_path, "true")
    _wait_done(tmp_path / "runs")
    writer = MetricsWriter(run.layout.metrics, "train", job_id="L1")
    for i in range(1, 6):
        writer.write("train", epoch=0, global_step=i * 10, loss=1.0 / i, samples_per_s=100.0 * i)
    writer.write("eval", epoch=0, val_mae=1.0, val_smape=0.6, baseline_same_smape=1.0,
                 baseline_roll4_smape=1.1, improvement_pct=40.0)
    result = CliRunner().invoke(main, ["summarize", "--plot", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    png = run.layout.root / "summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "| 0 | 0.2 | 1 | 0.6 | 1 | 1.1 | 40% |" in result.output


def _named_commands(text: str, code_lines: bool = False) -> set[str]:
    """Every `hpcpipe WORD` a user is told to run: in backticks, or (``code_lines``, for the
    README) a command line in a code block."""
    found = set(re.findall(r"`hpcpipe ([a-z][a-z-]*)", text))
    if code_lines:
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S):
            found |= set(re.findall(r"^\s*(?:\$ )?hpcpipe ([a-z][a-z-]*)", block, re.M))
    return found


def test_every_hpcpipe_command_named_in_a_message_or_the_readme_exists() -> None:
    import ast

    known = {name.split()[0] for name, _ in _commands(main)}
    root = Path(__file__).resolve().parents[1]
    named: dict[str, set[str]] = {"README.md": _named_commands((root / "README.md").read_text(), True)}
    for path in sorted((root / "hpcpipe").rglob("*.py")):
        strings = [n.value for n in ast.walk(ast.parse(path.read_text()))
                   if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        named[str(path.relative_to(root))] = _named_commands("\n".join(strings))
    assert named["README.md"] >= {"submit", "status", "logs", "summarize", "rerun", "cancel"}
    unknown = {f: sorted(words - known) for f, words in named.items() if words - known}
    assert not unknown, f"messages name commands that do not exist: {unknown}"
