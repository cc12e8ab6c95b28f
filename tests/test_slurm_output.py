"""The parsers against what Slurm 22.05 and 25.11 really print: output recorded on the two test
clusters by tests/slurm/record-fixtures.sh (tests/fixtures/slurm/<version>/, each file starting
with the command that printed it). tests/slurm/VERSIONS.md lists the differences."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcpipe.scheduler.slurm import parse_sacct, parse_scontrol, parse_sinfo, parse_squeue
from hpcpipe.scheduler.states import Phase, meaning

FIXTURES = Path(__file__).parent / "fixtures" / "slurm"
VERSIONS = ["22.05", "25.11"]


def output(version: str, name: str) -> str:
    """The recorded standard output, without the command and rc lines."""
    lines = (FIXTURES / version / f"{name}.txt").read_text().splitlines()
    return "\n".join(ln for ln in lines if not ln.startswith("# "))


@pytest.mark.parametrize("version", VERSIONS)
def test_every_state_either_version_printed_is_in_the_table(version: str) -> None:
    seen = set()
    for path in sorted((FIXTURES / version).glob("squeue_*.txt")):
        seen |= {i.state for i in parse_squeue(output(version, path.stem)).values()}
    for path in sorted((FIXTURES / version).glob("sacct_*.txt")):
        seen |= {i.state for i in parse_sacct(output(version, path.stem)).values()}
    assert {"PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"} <= seen, seen
    unknown = sorted(s for s in seen if meaning(s).phase is Phase.UNKNOWN)
    assert not unknown, f"Slurm {version} printed states the table does not know: {unknown}"


@pytest.mark.parametrize("version", VERSIONS)
def test_squeue_pending_running_and_dependencies(version: str) -> None:
    jobs = parse_squeue(output(version, "squeue_pending_running"))
    states = sorted(i.state for i in jobs.values())
    assert states.count("RUNNING") == 2 and states.count("PENDING") == 3, jobs
    waiting = [i for i in jobs.values() if i.reason == "Dependency"]
    assert len(waiting) == 2 and all(not i.start for i in waiting)  # N/A: never started
    running = [i for i in jobs.values() if i.state == "RUNNING"]
    assert all(i.nodes and i.start for i in running)

    failed = parse_squeue(output(version, "squeue_dependency_failed"))
    never = [i for i in failed.values() if i.state in ("PENDING", "CANCELLED") and i.job_id != min(
        failed, key=int)]
    assert never and all(i.reason == "DependencyNeverSatisfied" for i in never), failed


@pytest.mark.parametrize("version", VERSIONS)
def test_a_completing_job_is_still_running(version: str) -> None:
    (info,) = parse_squeue(output(version, "squeue_completing")).values()
    assert info.state == "COMPLETING" and not info.terminal and meaning(info.state).active


@pytest.mark.parametrize("version", VERSIONS)
def test_sacct_ended_jobs(version: str) -> None:
    jobs = parse_sacct(output(version, "sacct_completed_failed"))
    assert {"COMPLETED", "FAILED"} <= {i.state for i in jobs.values()}, jobs
    assert all(i.terminal and i.end for i in jobs.values())
    done = next(i for i in jobs.values() if i.state == "COMPLETED")
    assert done.exit_code == "0:0" and done.start and done.extra["alloc_cpus"]

    (never,) = parse_sacct(output(version, "sacct_dependency_never_cancelled")).values()
    # 22.05 keeps Reason=Dependency, 25.11 prints None; either way it never started.
    assert never.state == "CANCELLED" and not never.start and not never.nodes

    requeued = parse_sacct(output(version, "sacct_requeued"))
    assert any(i.restarts >= 1 for i in requeued.values()), requeued


@pytest.mark.parametrize("version", VERSIONS)
def test_scontrol_show_job_fields_with_spaces_do_not_spill(version: str) -> None:
    """25.11 adds SubmitLine=, whose value has spaces and '=' in it."""
    kv = parse_scontrol(output(version, "scontrol_show_job_running").splitlines()[0])
    assert kv["JobState"] == "RUNNING" and kv["NodeList"] and kv["Restarts"] == "0"
    assert kv["TimeLimit"] == "00:10:00"
    requeued = parse_scontrol(output(version, "scontrol_show_job_requeued").splitlines()[0])
    assert int(requeued["Restarts"]) >= 1


@pytest.mark.parametrize("version", VERSIONS)
def test_sinfo_nodes_partitions_cpus_memory_gpus(version: str) -> None:
    nodes, default = parse_sinfo(output(version, "sinfo_nodes"))
    assert default == "debug"
    assert sorted(n.name for n in nodes) == ["n1", "n2"]
    for n in nodes:
        assert (n.cpus, n.memory_mb, n.gpus) == (32, 64000, 2) and n.partitions == ["debug", "short"]
