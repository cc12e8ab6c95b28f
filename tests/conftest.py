"""Shared test fixtures: the real Slurm test cluster.

Tests marked ``@pytest.mark.slurm`` get the cluster started by ``tests/slurm/testbed.sh`` (two
nodes n1, n2 on this machine, accounting through slurmdbd) and ``SLURM_CONF`` set in the
environment, so plain ``sbatch``/``squeue``/``sacct`` calls and hpcpipe's own code reach it.
Outside CI they are skipped unless pytest runs as root; under ``CI=true`` they always run, and a
skipped slurm test counts as a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcpipe.scheduler.states import ENDED_STATES

TESTBED = Path(__file__).parent / "slurm" / "testbed.sh"


# "Key=value Key=value" where a value may contain spaces (Command=, WorkDir=, Reason=...).
_SCONTROL_FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w/:]*)=")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def parse_scontrol_line(line: str) -> dict[str, str]:
    """Turn one ``scontrol show ... -o`` line into a dict."""
    matches = list(_SCONTROL_FIELD.finditer(line.strip()))
    fields = {}
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following else len(line.strip())
        fields[match.group(1)] = line.strip()[match.end() : end].strip()
    return fields


@dataclass(frozen=True)
class SlurmCluster:
    """The running test cluster, as the ``slurm_cluster`` fixture hands it to tests."""

    conf: Path
    state_dir: Path
    cluster_name: str = "hpcpipe-test"
    nodes: tuple[str, ...] = ("n1", "n2")
    default_partition: str = "debug"  # Default=YES, MaxTime=INFINITE
    short_partition: str = "short"  # MaxTime=00:10:00
    partitions: tuple[str, ...] = ("debug", "short", "urgent")  # urgent preempts the others

    def sbatch(self, *args: str, cwd: str | Path | None = None) -> str:
        """Submit with ``sbatch --parsable ARGS`` and return the job id."""
        out = _run(["sbatch", "--parsable", *args], cwd=cwd)
        return out.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o JOB`` as a dict; empty once Slurm has forgotten the job."""
        proc = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True
        )
        if proc.returncode != 0 or not proc.stdout.strip():
            return {}
        return parse_scontrol_line(proc.stdout.splitlines()[0])

    def sacct_state(self, job_id: str) -> str:
        """The job's state in accounting (first word: "CANCELLED by 0" -> "CANCELLED")."""
        out = _run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State"])
        lines = [line for line in out.splitlines() if line.strip()]
        return lines[0].split()[0] if lines else ""

    def state(self, job_id: str) -> str:
        """The job's current state, from scontrol, or from sacct once scontrol forgot it."""
        state = self.job_info(job_id).get("JobState", "")
        return state or self.sacct_state(job_id)

    def wait_state(self, job_id: str, states: str | Iterable[str], timeout: float = 60) -> str:
        """Poll until the job is in one of ``states`` and return that state.

        Fails at once if the job ends in a state not asked for, and after ``timeout`` seconds
        with the job's full ``scontrol`` record in the message.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        state = ""
        while True:
            state = self.state(job_id)
            if state in wanted:
                return state
            if state in ENDED_STATES:
                pytest.fail(
                    f"job {job_id} ended {state}, expected {sorted(wanted)}: "
                    f"{self.job_info(job_id)}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"job {job_id} still {state or 'unknown'} after {timeout}s, expected "
                    f"{sorted(wanted)}: {self.job_info(job_id)}"
                )
            time.sleep(0.25)

    def wait_sacct(self, job_id: str, states: str | Iterable[str], timeout: float = 30) -> str:
        """Poll accounting, which trails scontrol by a moment, until it shows one of ``states``."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while (state := self.sacct_state(job_id)) not in wanted:
            if time.monotonic() > deadline:
                pytest.fail(f"sacct shows job {job_id} {state or 'missing'}, expected {wanted}")
            time.sleep(0.25)
        return state

    def make_eligible(self, job_id: str) -> None:
        """Let a requeued job start now instead of after Slurm's ~120 s requeue delay.

        First wait until the node has finished ending the last start (no slurmstepd of the job
        left on this one-machine cluster): until then slurmd holds the job's credential revoked,
        and a start made at once is killed ("Job credential revoked", seen on 22.05: FAILED 1:0
        in 0 s). Slurm's own delay never lets that happen.

        Then start in a later second than the requeue: slurmd also refuses a credential made in
        the same whole second as the revocation (``cred->ctime <= j->revoked``, cred_context.c).
        Seen on 22.05: requeued at 13:43:45.115, started again at 13:43:45.659 with no slurmstepd
        left, "Killing non-startable batch JobId=136: Job credential revoked", FAILED 1:0."""
        called = time.time()  # the requeue, and so its revocation, came before this call
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            steps = subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job_id}\."],
                                   capture_output=True, text=True)
            if steps.returncode != 0:
                break
            time.sleep(0.2)
        time.sleep(max(0.0, int(called) + 1.05 - time.time()))
        _run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def cancel(self, *job_ids: str) -> None:
        """``scancel`` the jobs; already finished ones are fine."""
        if job_ids:
            subprocess.run(["scancel", *map(str, job_ids)], capture_output=True)


def _run(cmd: list[str], cwd: str | Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start (or reuse) the test cluster and point ``SLURM_CONF`` at it for the session.

    The cluster stays up afterwards, so the next pytest run starts at once; set
    ``HPCPIPE_TESTBED_STOP=1`` to stop it at the end of the session.
    """
    is_root = os.geteuid() == 0
    if not is_root and not in_ci():
        pytest.skip(
            "the Slurm test cluster needs root: run pytest as root, or start it with "
            "`sudo bash tests/slurm/testbed.sh start` and run with CI=true"
        )
    # In CI as a normal user (e.g. GitHub's runner) the script runs through passwordless sudo.
    sudo = [] if is_root else ["sudo", "-n",
                                "--preserve-env=HPCPIPE_TESTBED_DIR,HPCPIPE_SLURM_VERSION"]
    if sudo and shutil.which("sudo") is None:
        pytest.fail("CI=true as a normal user, but there is no sudo to start the cluster")
    proc = subprocess.run([*sudo, "bash", str(TESTBED), "start"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(
            f"could not start the Slurm test cluster ({TESTBED} start, exit code "
            f"{proc.returncode}):\n{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )
    # The cluster's client environment (SLURM_CONF, and for 25.11 its binaries first on PATH),
    # as HPCPIPE_SLURM_VERSION selects it: every command the tests run gets it.
    env = _testbed_env(sudo)
    conf = Path(env["SLURM_CONF"]).resolve()
    cluster = SlurmCluster(conf=conf, state_dir=conf.parent)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield cluster
        if os.environ.get("HPCPIPE_TESTBED_STOP") == "1":
            subprocess.run([*sudo, "bash", str(TESTBED), "stop"], check=False)


def _testbed_env(sudo: list[str]) -> dict[str, str]:
    """``testbed.sh env`` (lines ``export KEY=VALUE``, $PATH expanded) as a dict."""
    out = subprocess.run([*sudo, "bash", str(TESTBED), "env"], capture_output=True, text=True,
                         check=True).stdout
    env = {}
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        if key:
            env[key] = value.replace("$PATH", os.environ.get("PATH", ""))
    return env


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every ``@pytest.mark.slurm`` test the cluster without naming the fixture.

    First in line, so the test's other fixtures (module-scoped ones too) already see SLURM_CONF.
    """
    for item in items:
        names = getattr(item, "fixturenames", None)
        if item.get_closest_marker("slurm") and names is not None and "slurm_cluster" not in names:
            names.insert(0, "slurm_cluster")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Under CI a skipped slurm test is a failure: it must never pass by not running."""
    report = yield
    xfailed = hasattr(report, "wasxfail")
    if report.skipped and not xfailed and in_ci() and item.get_closest_marker("slurm"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"slurm test skipped under CI=true, which is not allowed: {reason}"
    return report


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, saved like any local model folder: the
    training tests exercise DDP, checkpoints and signals, not the text model, so they use this."""
    import torch
    from transformers import BertConfig, BertModel

    from hpcpipe.steps.train.model import default_model_dir, load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = load_tokenizer(default_model_dir())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
