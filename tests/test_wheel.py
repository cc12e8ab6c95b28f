"""The package as users install it: a wheel built from this repository, installed into a fresh
virtual environment, run from an unrelated folder with the shipped local config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding only the hpcpipe wheel; its dependencies (torch, dask...)
    come from this interpreter's site-packages, appended after the venv's own (a .pth line), so
    the wheel's hpcpipe wins over any hpcpipe installed here (editable or not)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp / "dist"), str(REPO)], check=True,
                   cwd=tmp)
    (wheel,) = (tmp / "dist").glob("hpcpipe-*.whl")
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "zz_outer_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)],
                   check=True)
    return env_dir


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("HPCPIPE_", "PYTHON", "SLURM_")) and k != "VIRTUAL_ENV"}


def test_the_wheel_carries_templates_configs_and_job_entries(venv: Path, tmp_path: Path) -> None:
    code = ("import hpcpipe, importlib.resources as r\n"
            "print(hpcpipe.__file__)\n"
            "for pkg, end in (('hpcpipe.sbatch', '.sbatch'), ('hpcpipe.configs', '.yaml')):\n"
            "    print(sorted(p.name for p in r.files(pkg).iterdir() if p.name.endswith(end)))\n"
            "import hpcpipe.jobs.ingest, hpcpipe.jobs.features\n")
    out = subprocess.run([venv / "bin" / "python", "-c", code], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith(str(venv)), out  # the wheel's hpcpipe, not the source tree's
    assert out[1] == "['features.sbatch', 'ingest.sbatch', 'train.sbatch']"
    assert out[2] == "['default.yaml', 'local.yaml']"


def test_submit_local_wait_from_an_unrelated_folder_completes(venv: Path, tmp_path: Path) -> None:
    """`pip install .` then `hpcpipe submit --local --wait` in a folder that is not the clone
    (it failed with FileNotFoundError on .../site-packages/sbatch/ingest.sbatch)."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    hp = venv / "bin" / "hpcpipe"
    proc = subprocess.run([hp, "submit", "--local", "--wait"], cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = json.loads(subprocess.run([hp, "status", "--json"], cwd=work, env=_env(),
                                       capture_output=True, text=True, check=True).stdout)
    assert [(s["step"], s["state"]) for s in status["steps"]] == [
        ("ingest", "COMPLETED"), ("features", "COMPLETED"), ("train", "COMPLETED")]
    (run_dir,) = (work / "runs").iterdir()
    script = (run_dir / "sbatch" / "train.sbatch").read_text()
    assert f"{venv}/bin/python -u -m hpcpipe.jobs.train" in script
    # The shipped local config was used, not the cluster defaults.
    assert "num_workers: 1" in (run_dir / "config.yaml").read_text()


def test_a_job_started_in_the_clone_it_was_installed_from_finds_its_entry(venv: Path) -> None:
    """Slurm starts a job in the folder it was submitted from. Submitted from the clone the wheel
    was built from, `python -m hpcpipe.jobs.<step>` imports hpcpipe from the clone (the working
    folder comes first), whose jobs/ and sbatch/ sit beside the package, not in it: `make run`
    after `pip install .` failed with "No module named 'hpcpipe.jobs'"."""
    code = ("import hpcpipe, hpcpipe.jobs.ingest, importlib.resources as r\n"
            "print(hpcpipe.__file__)\n"
            "print(sorted(p.name for p in r.files('hpcpipe.sbatch').iterdir()"
            " if p.name.endswith('.sbatch')))\n")
    out = subprocess.run([venv / "bin" / "python", "-c", code], cwd=REPO, env=_env(),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(REPO / "hpcpipe" / "__init__.py")  # the clone's, as Python picks it
    assert lines[1] == "['features.sbatch', 'ingest.sbatch', 'train.sbatch']"
