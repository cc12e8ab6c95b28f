"""`hpcpipe doctor` and the scripts submit renders, on the real test cluster (22.05 by default,
25.11 with HPCPIPE_SLURM_VERSION=25.11): the facts against `scontrol show config` and `sinfo`
read here directly, and every rendered script of the README's command and its 2-node variant
taken by `sbatch --test-only`."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.hpcli import hp

pytestmark = pytest.mark.slurm


def _out(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _config() -> dict[str, str]:
    out = _out("scontrol", "show", "config")
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in out.splitlines())
            if _}


def test_doctor_facts_match_scontrol_and_sinfo(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    facts = json.loads(hp(tmp_path, "doctor", "--json", env=env).stdout)
    config = _config()
    version = re.search(r"(\d+\.\d+\.\d+)", _out("sinfo", "--version")).group(1)
    assert facts["slurm_version"] == version == config["SLURM" + "_VERSION"]
    assert facts["cluster"] == config["ClusterName"]
    assert facts["select_type"] == config["SelectType"]
    assert facts["accounting_storage"] == config["AccountingStorageType"]
    assert facts["accounting_error"] == ""  # the test cluster has slurmdbd
    assert facts["max_array_size"] == int(config["MaxArraySize"])
    assert facts["job_file_append"] == (config["JobFileAppend"] == "1")
    assert facts["preempt_mode"] == config["PreemptMode"]
    # cons_tres here: sbatch --test-only took --gpus-per-node
    assert facts["gpus_per_node_ok"] and "test-only" in facts["gpus_per_node_how"]
    rows = {tuple(line.split("|")[:5]) for line in
            _out("sinfo", "-h", "-N", "-o", "%N|%P|%c|%m|%G").splitlines()}
    seen = {(n["name"], p + ("*" if p == "debug" else ""), str(n["cpus"]), str(n["memory_mb"]),
             f"gpu:{n['gpus']}") for n in facts["nodes"] for p in n["partitions"]}
    assert seen == rows
    parts = {line.split()[0].split("=")[1]: line for line in
             _out("scontrol", "show", "partition", "-o").splitlines()}
    for p in facts["partitions"]:
        assert f"MaxTime={p['max_time']} " in parts[p["name"]]
        assert f"MaxNodes={p['max_nodes'] or 'UNLIMITED'} " in parts[p["name"]]
    assert {p["name"]: p["max_time"] for p in facts["partitions"]} == \
        {"debug": "UNLIMITED", "short": "00:10:00", "urgent": "00:10:00"}
    cached = tmp_path / "cache" / "hpcpipe" / f"site-{config['ClusterName']}.json"
    assert facts["cache"] == str(cached) and json.loads(cached.read_text())["cluster"] == \
        config["ClusterName"]
    text = hp(tmp_path, "doctor", env=env).stdout
    assert "GPU requests as --gpus-per-node=N" in text and "MaxTime 00:10:00" in text


@pytest.mark.parametrize("layout", [["--cpus", "32", "--gpus", "2"],
                                    ["--cpus", "32", "--gpus", "4", "--gpus-per-node", "2"]],
                         ids=["readme", "two-nodes"])
def test_dry_run_scripts_are_taken_by_sbatch_test_only(tmp_path: Path, layout: list[str]) -> None:
    """The README's command verbatim (default config), rendered from the probed facts: each
    script passes `sbatch --test-only` on this cluster, GPUs as --gpus-per-node, memory per
    CPU/GPU."""
    proc = hp(tmp_path, "submit", "--dry-run", *layout,
              env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    scripts = re.findall(r"^# ---- (\S+)\n(.*?)\n\$ sbatch", proc.stdout, re.S | re.M)
    assert [Path(p).name for p, _ in scripts] == ["ingest.sbatch", "features.sbatch",
                                                  "train.sbatch"], proc.stdout
    assert list((tmp_path / "cache" / "hpcpipe").glob("site-*.json"))  # probed once, cached
    for path, text in scripts:
        script = tmp_path / Path(path).name
        script.write_text(text + "\n")
        test = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True,
                              text=True)
        assert test.returncode == 0, (path, test.stderr, text)
        assert re.search(r"to start at (\S+).* on nodes (\S+) in partition (\S+)", test.stderr)
    train = scripts[2][1].splitlines()
    assert "#SBATCH --gpus-per-node=2" in train and "#SBATCH --mem-per-gpu=15G" in train
    assert f"#SBATCH --nodes={1 if '4' not in layout else 2}" in train
    assert "#SBATCH --mem-per-cpu=1900M" in scripts[1][1].splitlines()


def test_time_above_the_partitions_maxtime_is_refused_before_anything_exists(
        tmp_path: Path) -> None:
    proc = hp(tmp_path, "submit", "--partition", "short", "--set", "ingest.time=5",
              "--set", "features.time=5", check=False,
              env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert ("train.time 12:00:00 is above partition short's MaxTime 00:10:00; lower train.time "
            "or pass --partition") in proc.stderr
    assert not (tmp_path / "runs").exists()
