"""Every check that can be made before queueing is made before queueing (issue 11, class 7), and
working folders whose path needs quoting in an ``#SBATCH`` line work (class 10).

Each refusal says what, where (the key, or file:line) and how to fix it, before a run folder or a
job exists. The Slurm tests run on the real test cluster (tests/slurm/testbed.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcpipe.config import check_paths, load_config
from hpcpipe.control.render import render_step
from hpcpipe.errors import ConfigError
from hpcpipe.run.layout import RunLayout
from hpcpipe.scheduler import local
from hpcpipe.scheduler.local import LocalBackend
from hpcpipe.scheduler.slurm_backend import SlurmBackend
from tests.hpcli import hp, wait_for

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# A folder name that needs quoting in an #SBATCH line: a space, a non-ASCII letter, a `%` (a
# Slurm filename pattern), a `#` (a comment outside quotes) and a double quote.
ODD = 'a b é%x#"q'


# ---------------------------------------------------------------------------------------------
# Numbers: finite, and not negative where a negative makes no sense.


@pytest.mark.parametrize("override", [
    "train.lr=.nan", "train.lr=inf", "train.lr=.inf", "train.encoder_lr=nan",
    "train.grad_clip=.nan", "train.weight_decay=-.inf", "train.weight_decay=.inf"])
def test_non_finite_numbers_are_refused_naming_the_key(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "default.yaml", [override])
    assert f"{key}: " in str(err.value) and "not a finite number" in str(err.value), str(err.value)


@pytest.mark.parametrize(("override", "message"), [
    ("train.warmup_steps=-1", "train.warmup_steps must not be negative, got -1"),
    ("train.grad_clip=-1", "train.grad_clip must be positive, got -1.0"),
    ("train.grad_clip=0", "train.grad_clip must be positive, got 0.0"),
    ("train.weight_decay=-0.1", "train.weight_decay must not be negative, got -0.1"),
    ("train.max_steps_per_epoch=-5", "train.max_steps_per_epoch must not be negative, got -5"),
    ("train.checkpoint_every=-1", "train.checkpoint_every must be a positive integer, got -1"),
    ("train.log_every=-20", "train.log_every must be a positive integer, got -20"),
    ("train.num_workers=-1", "train.num_workers must not be negative, got -1"),
    ("train.signal_seconds=-1", "train.signal_seconds must not be negative, got -1"),
    ("train.train_weeks=-1", "train.train_weeks must not be negative, got -1"),
    ("train.seed=-1", "train.seed must not be negative, got -1"),
    ("data.seed=-3", "data.seed must not be negative, got -3"),
    ("data.synth_products=0", "data.synth_products must be a positive integer, got 0"),
    ("ingest.future_tolerance_days=-2", "ingest.future_tolerance_days must not be negative"),
])
def test_negative_steps_clips_and_decays_are_refused_naming_the_key(override: str,
                                                                    message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "default.yaml", [override])
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize("value", ["lots", "4XB", "-4GB", "0", "0GB", "GB", "4 G B", ".nan"])
def test_a_worker_memory_that_is_not_a_size_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"features.worker_memory: .* is not a memory size"):
        load_config(CONFIGS / "default.yaml", [f"features.worker_memory={value!r}"])


@pytest.mark.parametrize("value", ["auto", "AUTO", "4GB", "4gb", "500MiB", "4 GB", "1.5GB",
                                   "4000000000", "64G", "2TiB", "100kB", "8192B"])
def test_every_worker_memory_the_config_takes_dask_takes_too(value: str) -> None:
    from dask.utils import parse_bytes

    cfg = load_config(CONFIGS / "default.yaml", [f"features.worker_memory={value!r}"])
    if cfg.features.worker_memory.lower() != "auto":
        assert parse_bytes(cfg.features.worker_memory) > 0


@pytest.mark.parametrize("value", ["99999:00:00", "366-00:00:00", "600000", "0", "00:00:00",
                                   "0-0"])
def test_absurd_time_limits_are_refused(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "default.yaml", [f"features.time={value!r}"])
    assert f"features.time: {value!r}" in str(err.value), str(err.value)


def test_a_time_limit_up_to_a_year_is_taken() -> None:
    cfg = load_config(CONFIGS / "default.yaml", ["ingest.time='365-00:00:00'", "train.time=5-0"])
    assert (cfg.ingest.time, cfg.train.time) == ("365-00:00:00", "5-0")


def test_submit_time_0_is_refused_before_anything_exists(tmp_path: Path) -> None:
    result = hp(tmp_path, "submit", "--local", "--time", "0", check=False)
    assert result.returncode == 1 and "ingest.time: '0'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# YAML: duplicate keys, null sections.


def test_a_duplicate_key_in_a_config_file_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\n  epochs: 3\n  lr: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{path}:4: train.lr is given twice (first at line 2)" in msg, msg
    assert "remove one" in msg


def test_a_duplicate_section_in_a_config_file_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\ningest:\n  cpus: 2\ntrain:\n  epochs: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:5: train is given twice (first at line 1)" in str(err.value), str(err.value)


def test_a_duplicate_key_in_a_set_value_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--set 'train=\{lr: 1, lr: 2\}': train.lr is given "
                                          "twice"):
        load_config(None, ["train={lr: 1, lr: 2}"])


@pytest.mark.parametrize("override", ["train=null", "train=", "train=~", "data=null",
                                      "slurm=null"])
def test_set_section_null_is_refused_instead_of_resetting_it(override: str) -> None:
    section = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "default.yaml", [override])
    msg = str(err.value)
    assert f"--set {override!r}" in msg and f"{section}." in msg and "section" in msg, msg


@pytest.mark.parametrize("value", ["0", "false", "''", "[]"])
def test_a_section_that_is_not_a_mapping_is_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"train: {value}\n")
    with pytest.raises(ConfigError, match="train: expected a mapping of keys"):
        load_config(path)


# ---------------------------------------------------------------------------------------------
# Paths: inputs that are files, an interpreter that runs.


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "r.jsonl").write_text("{}\n")
    (tmp_path / "m.jsonl").write_text("{}\n")
    return tmp_path / "r.jsonl", tmp_path / "m.jsonl"


def test_a_folder_as_an_input_file_is_refused(tmp_path: Path) -> None:
    reviews, meta = _inputs(tmp_path)
    folder = tmp_path / "amazon23"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"data.reviews\[1\]: .*amazon23 is a folder, not a file;"
                                          " list the files in it"):
        check_paths(load_config(None, [f"data.reviews=[{reviews}, {folder}]",
                                       f"data.metadata={meta}"]))
    with pytest.raises(ConfigError, match=r"data.metadata: .*amazon23 is a folder, not a file"):
        check_paths(load_config(None, [f"data.reviews=[{reviews}]", f"data.metadata={folder}"]))


def test_a_slurm_python_that_cannot_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"slurm.python: /nonexistent/python3 does not exist"):
        check_paths(load_config(None, ["slurm.python=/nonexistent/python3"]))
    plain = tmp_path / "python3"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    with pytest.raises(ConfigError, match=r"slurm.python: .*python3 is not executable"):
        check_paths(load_config(None, [f"slurm.python={plain}"]))
    with pytest.raises(ConfigError, match=r"slurm.python: .* is a folder"):
        check_paths(load_config(None, [f"slurm.python={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"slurm.python: 'pyhton3' is not on PATH"):
        check_paths(load_config(None, ["slurm.python=pyhton3"]))
    check_paths(load_config(None, [f"slurm.python={sys.executable}"]))
    check_paths(load_config(None, ["slurm.python=python3"]))
    # A bare name that setup lines may provide (module load python) cannot be checked here.
    check_paths(load_config(None, ["slurm.python=python3.99", "slurm.setup=[module load py]"]))


# ---------------------------------------------------------------------------------------------
# Setup lines: a failing one fails the step, saying which.


def _run_script(tmp_path: Path, setup: list[str]) -> subprocess.CompletedProcess:
    # A stand-in for the interpreter: it shows the environment the step would start in.
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho step-started\nenv\n")
    python.chmod(0o755)
    cfg = load_config(CONFIGS / "local.yaml",
                      [f"slurm.setup={json.dumps(setup)}", f"slurm.python={python}"])
    text = render_step(cfg, RunLayout(tmp_path / "runs" / "r1"), "ingest", LocalBackend(tmp_path),
                       tmp_path / "logs")
    script = tmp_path / "ingest.sbatch"
    script.write_text(text)
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "HPCPIPE_SETUP_X": ""})


def test_a_failing_setup_line_fails_the_step_saying_which(tmp_path: Path) -> None:
    proc = _run_script(tmp_path, ["echo setup-ran", "module load nosuchmodule/1.0",
                                  "echo not-reached"])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "hpcpipe: setup line slurm.setup[1] failed with exit code" in out, out
    assert "module load nosuchmodule/1.0" in out.split("slurm.setup[1]", 1)[1], out
    assert "setup-ran" in out and "not-reached" not in out and "step-started" not in out


def test_setup_lines_that_succeed_still_shape_the_step_environment(tmp_path: Path) -> None:
    proc = _run_script(tmp_path, ["export HPCPIPE_SETUP_X=from-setup  # a comment",
                                  "if true; then export HPCPIPE_SETUP_Y=1; fi"])
    assert proc.returncode == 0, proc.stderr
    assert "HPCPIPE_SETUP_X=from-setup" in proc.stdout and "HPCPIPE_SETUP_Y=1" in proc.stdout


# ---------------------------------------------------------------------------------------------
# Paths that need quoting in #SBATCH lines (class 10).


@pytest.mark.parametrize("name", ["a b", "é", "100%", "%j", "x#y", 'q"q', "it's", "tab\there"])
def test_a_logs_folder_needing_quotes_round_trips_through_the_sbatch_line(tmp_path: Path,
                                                                          name: str) -> None:
    cfg = load_config(CONFIGS / "default.yaml", [])
    logs = tmp_path / name / "run-1"
    text = render_step(cfg, RunLayout(tmp_path / "r"), "ingest", SlurmBackend(), logs)
    line = next(x for x in text.splitlines() if x.startswith("#SBATCH --output="))
    assert local.sbatch_output_path(text, "1234") == logs / "ingest-1234.out", line


@pytest.mark.parametrize(("name", "why"), [("a\nb", "newline"), ("a\\b", "backslash")])
def test_a_logs_folder_sbatch_cannot_take_is_refused_clearly(tmp_path: Path, name: str,
                                                              why: str) -> None:
    cfg = load_config(CONFIGS / "default.yaml", [])
    with pytest.raises(ConfigError) as err:
        render_step(cfg, RunLayout(tmp_path / "r"), "ingest", SlurmBackend(), tmp_path / name)
    assert "logs folder" in str(err.value) and why in str(err.value), str(err.value)


@pytest.mark.parametrize(("line", "expected"), [
    ('#SBATCH --output="/l/a b/x-%j.out"', "/l/a b/x-77.out"),
    ("#SBATCH --output='/l/a b/%%-%j.out'", "/l/a b/%-77.out"),
    (r"#SBATCH --output=/l/a\ b/x-%j.out  # comment", "/l/a b/x-77.out"),
    ('#SBATCH --output="/l/q\\"q/x.out"', '/l/q"q/x.out'),
    ("#SBATCH --output /l/x-%j.out", "/l/x-77.out"),
    ("#SBATCH -o /l/x-%j.out", "/l/x-77.out"),
])
def test_the_local_runner_reads_output_as_sbatch_does(line: str, expected: str) -> None:
    assert local.sbatch_output_path(f"#!/bin/bash\n{line}\necho\n", "77") == Path(expected)


def test_a_local_run_from_a_folder_needing_quotes_logs_where_it_should(tmp_path: Path) -> None:
    """The default ./logs under a folder whose path has a space, a non-ASCII letter and a `%`."""
    cwd = tmp_path / ODD
    cwd.mkdir()
    result = hp(cwd, "submit", "--local", "--wait", "--steps", "ingest", "--set",
                "data.synth_reviews=500", check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = next((cwd / "runs").iterdir()).name
    job = json.loads((cwd / "runs" / run_id / "state.json").read_text())[
        "steps"]["ingest"]["jobs"][0]["job_id"]
    log = cwd / "logs" / run_id / f"ingest-{job}.out"
    assert log.is_file(), sorted(str(p) for p in cwd.rglob("*.out"))
    assert "step ingest finished" in log.read_text()
    assert "step ingest finished" in hp(cwd, "logs", "ingest").stdout


# ---------------------------------------------------------------------------------------------
# On the real cluster.


def _state(cwd: Path) -> dict:
    return json.loads(next((cwd / "runs").iterdir()).joinpath("state.json").read_text())


@pytest.mark.slurm
def test_folders_needing_quotes_work_on_slurm(tmp_path: Path, slurm_cluster) -> None:
    """Runs and logs folders with a space, a non-ASCII letter, `%`, `#` and a double quote: the
    job's log lands at logs/<run-id>/ingest-<jobid>.out."""
    cwd = tmp_path / ODD
    cwd.mkdir()
    hp(cwd, "submit", "--steps", "ingest", "--set", "data.synth_reviews=500", "--set",
       "ingest.time=5")
    state = _state(cwd)
    job = state["steps"]["ingest"]["jobs"][0]["job_id"]
    try:
        slurm_cluster.wait_state(job, "COMPLETED", timeout=180)
    finally:
        slurm_cluster.cancel(job)
    log = cwd / "logs" / state["run_id"] / f"ingest-{job}.out"
    assert log.is_file(), sorted(str(p) for p in tmp_path.rglob("*.out"))
    assert "step ingest finished" in log.read_text()
    assert "step ingest finished" in hp(cwd, "logs", "ingest").stdout


@pytest.mark.slurm
def test_a_failing_setup_line_fails_the_job_on_slurm(tmp_path: Path, slurm_cluster) -> None:
    hp(tmp_path, "submit", "--steps", "ingest", "--set", "data.synth_reviews=500", "--set",
       "ingest.time=5", "--set", "slurm.setup=[module load nosuchmodule/1.0]")
    state = _state(tmp_path)
    job = state["steps"]["ingest"]["jobs"][0]["job_id"]
    try:
        slurm_cluster.wait_state(job, "FAILED", timeout=120)
    finally:
        slurm_cluster.cancel(job)
    text = Path(state["steps"]["ingest"]["jobs"][0]["log"]).read_text()
    assert "setup line slurm.setup[0] failed" in text and "module load nosuchmodule/1.0" in text
    assert "step ingest" not in text, text


@pytest.mark.slurm
def test_rerun_set_is_checked_like_submit_and_a_refusal_leaves_the_config(
        tmp_path: Path, slurm_cluster) -> None:
    hp(tmp_path, "submit", "--steps", "ingest", "--set", "data.synth_reviews=500", "--set",
       "ingest.time=5", "--set", "features.cpus=2", "--set", "features.mem=2G")
    state = _state(tmp_path)
    config = next((tmp_path / "runs").iterdir()) / "config.yaml"
    before = config.read_bytes()
    ingest = state["steps"]["ingest"]["jobs"][0]["job_id"]
    try:
        # The layout check submit makes (sinfo): no node has 999 CPUs.
        bad = hp(tmp_path, "rerun", "features", "--set", "features.cpus=999", check=False)
        assert bad.returncode == 1 and "features asks for 999 CPUs" in bad.stderr, bad.stderr
        assert config.read_bytes() == before, "a refused override stayed in the run's config"
        # Refused by sbatch itself: the config is left as it was, so the next rerun is not
        # poisoned by it.
        bad = hp(tmp_path, "rerun", "features", "--set", "slurm.extra_sbatch=[--begin=garbage]",
                 check=False)
        assert bad.returncode == 1 and "features" in bad.stderr, bad.stderr
        assert config.read_bytes() == before, "an override sbatch refused stayed in the config"
        assert "features" not in _state(tmp_path)["steps"] or all(
            j["state"] == "CANCELLED" for j in _state(tmp_path)["steps"]["features"]["jobs"])
        # default.yaml's 64G is more than a test node's 64000 MB: sbatch would refuse it.
        bad = hp(tmp_path, "rerun", "features", "--set", "features.mem=64G", check=False)
        assert bad.returncode == 1 and "features.mem=64G is more memory than any node" in \
            bad.stderr, bad.stderr
        assert config.read_bytes() == before
        good = hp(tmp_path, "rerun", "features", "--set", "features.time=5")
        assert "features" in good.stdout
        assert "time: '5'" in config.read_text() or "time: \"5\"" in config.read_text()
        wait_for(tmp_path, lambda rows: rows["features"]["state"] == "COMPLETED", 240,
                 "features to complete after the refused reruns")
    finally:
        ids = [j["job_id"] for s in _state(tmp_path)["steps"].values() for j in s["jobs"]]
        slurm_cluster.cancel(ingest, *ids)
