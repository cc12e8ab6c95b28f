"""Rendered sbatch scripts: what they ask Slurm for, and that hostile values cannot inject."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hpcpipe.config import load_config
from hpcpipe.control.render import render_step
from hpcpipe.errors import ConfigError
from hpcpipe.run.layout import RunLayout
from hpcpipe.scheduler.local import LocalBackend
from hpcpipe.scheduler.slurm_backend import SlurmBackend

HOSTILE = ["; rm -rf /tmp/x", "$(touch /tmp/pwned)", "`touch /tmp/pwned`", "a\nrm -rf ~",
           "x' || touch /tmp/pwned '"]


def _render(tmp_path: Path, step: str, overrides: list[str], backend=None) -> str:
    cfg = load_config(None, overrides)
    layout = RunLayout(tmp_path / "runs" / "run-1")
    return render_step(cfg, layout, step, backend or SlurmBackend(), tmp_path / "logs" / "run-1")


def test_train_script_asks_for_ddp_layout_signal_and_requeue(tmp_path: Path) -> None:
    text = _render(tmp_path, "train", ["train.gpus=4", "train.gpus_per_node=2",
                                       "train.signal_seconds=120", "slurm.partition=gpu",
                                       "slurm.account=proj1", "train.mem=32G",
                                       "slurm.extra_sbatch=[--mail-type=END]"])
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --gres=gpu:2",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj1", "#SBATCH --mem=32G", "#SBATCH --mail-type=END",
                 "#SBATCH --open-mode=append"]:
        assert line in text.splitlines()
    assert "srun --kill-on-bad-exit=1 --label " in text
    assert f'--output="{tmp_path}/logs/run-1/train-%j.out"' in text


@pytest.mark.parametrize("step", ["ingest", "features"])
@pytest.mark.parametrize(("overrides", "nodes", "tasks", "cpus"), [
    (["cpus=64", "nodes=2"], 2, 32, 1),
    (["cpus=4", "nodes=2"], 2, 2, 1),
    (["cpus=2", "nodes=2"], 2, 2, 1),
    (["cpus=9", "nodes=3"], 3, 3, 1),
    (["cpus=32"], 1, 1, 32),
])
def test_dask_steps_ask_for_a_task_per_dask_process_on_several_nodes(
        tmp_path: Path, step: str, overrides: list[str], nodes: int, tasks: int,
        cpus: int) -> None:
    """Ingest and features render alike: on one node one task of all the CPUs (a LocalCluster);
    on several, a task per Dask process started by srun (SLURMRunner)."""
    text = _render(tmp_path, step, [f"{step}.{o}" for o in overrides])
    lines = text.splitlines()
    assert f"#SBATCH --nodes={nodes}" in lines
    assert f"#SBATCH --ntasks-per-node={tasks}" in lines
    assert f"#SBATCH --cpus-per-task={cpus}" in lines
    body = text.split("set -eo pipefail", 1)[1]
    assert ("srun --kill-on-bad-exit=1" in body) == (nodes > 1), body


def test_features_workers_of_several_threads_get_a_task_each(tmp_path: Path) -> None:
    lines = _render(tmp_path, "features", ["features.cpus=64", "features.nodes=2",
                                           "features.threads_per_worker=4"]).splitlines()
    assert "#SBATCH --ntasks-per-node=8" in lines and "#SBATCH --cpus-per-task=4" in lines


def test_local_scripts_start_the_step_without_srun(tmp_path: Path) -> None:
    text = _render(tmp_path, "train", [], LocalBackend(tmp_path))
    assert "srun" not in text.split("set -eo pipefail", 1)[1]


def test_setup_lines_go_in_verbatim_and_run_before_the_step(tmp_path: Path) -> None:
    text = _render(tmp_path, "features", ["slurm.setup=[module load cuda/12.4, source venv/x]"])
    lines = text.splitlines()

    def at(start: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(start))

    assert at("set -eo pipefail") < at("eval 'module load cuda/12.4' || ") < \
        at("eval 'source venv/x' || ") < at(sys.executable)


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("key", ["slurm.partition", "slurm.account", "slurm.qos",
                                 "slurm.constraint", "train.mem", "train.time"])
def test_hostile_values_for_sbatch_lines_are_refused(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError):
        _render(tmp_path, "train", [f"{key}={value!r}".replace("\n", "\\n")])


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_paths_are_quoted_in_the_command_line(tmp_path: Path, value: str) -> None:
    """A run folder or interpreter path with shell characters stays one word for bash."""
    cfg = load_config(None, [f"slurm.python={('/usr/bin/python3' + value)!r}".replace("\n", "\\n")])
    layout = RunLayout(tmp_path / f"runs{value.replace('/', '_')}" / "run-1")
    text = render_step(cfg, layout, "ingest", LocalBackend(tmp_path), tmp_path / "logs")
    cmd = text.split("export PYTHONUNBUFFERED", 1)[1].split("\n", 1)[1].strip()
    out = subprocess.run(["bash", "-c", f"set -- {cmd}; printf '%s\\0' \"$@\""],
                         capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    assert out[0] == cfg.slurm.python
    assert out[-1] == str(layout.root)
    assert not Path("/tmp/pwned").exists()


def test_hostile_log_folder_stays_one_quoted_sbatch_argument(tmp_path: Path) -> None:
    """A logs folder with shell characters is one double-quoted --output value (sbatch reads
    #SBATCH lines itself, no shell involved); `%` is written `%%`, `"` as `\\"`."""
    cfg = load_config(None, [])
    logs = tmp_path / 'logs dir; rm -rf ~ $(x) 50% "q"'
    text = render_step(cfg, RunLayout(tmp_path / "r"), "ingest", SlurmBackend(), logs)
    assert f'#SBATCH --output="{tmp_path}/logs dir; rm -rf ~ $(x) 50%% \\"q\\"/ingest-%j.out"' \
        in text.splitlines()
    with pytest.raises(ConfigError, match="logs folder: .* has a newline"):
        render_step(cfg, RunLayout(tmp_path / "r"), "ingest", SlurmBackend(), tmp_path / "a\nb")
