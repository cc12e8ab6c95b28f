"""The site's facts (hpcpipe.scheduler.site) from recorded outputs of Slurm 22.05 and 25.11, what
they change in the rendered scripts (golden files, compared byte for byte) and in the layout
check. No cluster needed: the facts are built from tests/fixtures/slurm/<version>/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcpipe.config import load_config
from hpcpipe.control.render import render_step
from hpcpipe.errors import ConfigError
from hpcpipe.run.layout import RunLayout
from hpcpipe.scheduler import site
from hpcpipe.scheduler.slurm_backend import SlurmBackend

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "rendered"


def _recorded(version: str, name: str) -> str:
    """The stdout part of a recorded command (between the `# cmd` line and `# rc=`/`# stderr`)."""
    lines = (FIXTURES / "slurm" / version / name).read_text().splitlines()
    return "\n".join(line for line in lines[1:] if not line.startswith("# ")) + "\n"


def recorded_facts(version: str, select_type: str | None = None) -> site.SiteFacts:
    """The test cluster's facts as hpcpipe derives them from what that version printed; with
    ``select_type`` the same site with another select plugin (the test cluster runs cons_tres)."""
    config = _recorded(version, "scontrol_show_config.txt")
    if select_type is not None:
        config = config.replace("select/cons_tres", select_type)
    return site.facts_from_outputs(config, _recorded(version, "sinfo_nodes.txt"),
                                   _recorded(version, "scontrol_show_partition.txt"), "")


@pytest.mark.parametrize(("version", "cluster", "full"), [("22.05", "hpcpipe-test", "22.05.8"),
                                                          ("25.11", "hpcpipe-2511", "25.11.7")])
def test_facts_from_what_each_version_prints(version: str, cluster: str, full: str) -> None:
    f = recorded_facts(version)
    assert (f.cluster, f.slurm_version, f.select_type) == (cluster, full, "select/cons_tres")
    assert f.accounting and f.cons_tres and f.gpus_per_node_ok
    assert (f.max_array_size, f.job_file_append, f.preempt_mode, f.preempt_signal) == \
        (1001, False, "OFF", False)
    assert [(n.name, n.cpus, n.memory_mb, n.gpus) for n in f.nodes] == \
        [("n1", 32, 64000, 2), ("n2", 32, 64000, 2)]
    debug, short = f.partition("debug"), f.partition("short")
    assert debug is f.partition(None) and debug.max_time_s is None and debug.max_nodes is None
    assert short is not None and not short.default and short.max_time_s == 600


def test_sbatch_test_only_verdicts_of_both_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    """--gpus-per-node counts as refused only where --gres=gpu:1 is taken; 25.11's text (with
    its stray " a ") is never parsed, only the exit code."""
    answers = {"--gpus-per-node=1": (False, "allocation failure: Requested node configuration "
                                            "is not available"), "--gres=gpu:1": (True, "")}
    monkeypatch.setattr(site.slurm, "sbatch_test_only", lambda args: answers[args[0]])
    ok, how = site._test_only_gpus_per_node("select/cons_res")
    assert not ok and "--gres=gpu:1 accepted" in how
    answers["--gres=gpu:1"] = answers["--gpus-per-node=1"]  # no GPU anywhere: the plugin decides
    assert site._test_only_gpus_per_node("select/cons_tres")[0]
    assert not site._test_only_gpus_per_node("select/linear")[0]


def test_a_site_without_cons_tres_says_what_hpcpipe_does_about_it() -> None:
    f = recorded_facts("22.05", "select/linear")
    assert not f.gpus_per_node_ok and not f.cons_tres
    said = dict(site.explain(f))
    assert any("GPU requests as --gres=gpu:N: this site's select plugin does not take "
               "--gpus-per-node" in a for a in said.values()), said
    assert "GPU requests as --gpus-per-node=N" in " ".join(dict(site.explain(recorded_facts(
        "25.11"))).values())


def test_facts_are_cached_per_cluster_and_reprobed_when_the_config_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    f = recorded_facts("25.11")
    path = site.save(f)
    assert path == tmp_path / "cache" / "hpcpipe" / "site-hpcpipe-2511.json"
    again = site.load_cached("hpcpipe-2511")
    assert again == f and site.load_cached("hpcpipe-test") is None
    from hpcpipe.scheduler.slurm import parse_show_config
    config = parse_show_config(_recorded("25.11", "scontrol_show_config.txt"))
    assert again.matches(config)
    assert not again.matches({**config, "SelectType": "select/linear"})
    path.write_text("{not json")
    assert site.load_cached("hpcpipe-2511") is None  # damaged: probed again, never an error


# ---------------------------------------------------------------------------------------------
# Rendered scripts: golden files for both GPU forms


GOLDEN_CASES = {
    # name: (facts version, select type, overrides, step)
    "train_gpus_per_node": ("25.11", None, ["train.gpus=4", "train.gpus_per_node=2"], "train"),
    "train_gres": ("22.05", "select/linear", ["train.gpus=4", "train.gpus_per_node=2"], "train"),
    "features_mem_per_cpu": ("22.05", None, ["features.cpus=32"], "features"),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_rendered_scripts_match_the_golden_files(name: str) -> None:
    """Like submitit's test_make_sbatch_string: a template or rendering change shows up as a
    reviewed diff of tests/fixtures/rendered/. Regenerate with HPCPIPE_REGEN_GOLDEN=1."""
    version, select, overrides, step = GOLDEN_CASES[name]
    cfg = load_config(FIXTURES.parent.parent / "configs" / "default.yaml",
                      [*overrides, "slurm.python=/opt/venv/bin/python"])
    text = render_step(cfg, RunLayout(Path("/scratch/runs/run-1")), step,
                       SlurmBackend(recorded_facts(version, select)), Path("/scratch/logs/run-1"))
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get("HPCPIPE_REGEN_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_bytes(text.encode())
    assert text.encode() == golden.read_bytes()


def test_gres_site_gets_gres_and_memory_per_node() -> None:
    text = (GOLDEN / "train_gres.sbatch").read_text().splitlines()
    assert "#SBATCH --gres=gpu:2" in text and "#SBATCH --mem=30G" in text
    assert not any("--gpus-per-node" in line or "--mem-per-gpu" in line for line in text)
    tres = (GOLDEN / "train_gpus_per_node.sbatch").read_text().splitlines()
    assert "#SBATCH --gpus-per-node=2" in tres and "#SBATCH --mem-per-gpu=15G" in tres
    assert not any("--gres" in line for line in tres)


# ---------------------------------------------------------------------------------------------
# The layout check with the partition's limits


def _check(monkeypatch: pytest.MonkeyPatch, overrides: list[str]) -> SlurmBackend:
    backend = SlurmBackend()
    monkeypatch.setattr(site, "for_layout_check", lambda: recorded_facts("25.11"))
    backend.check(load_config(FIXTURES.parent.parent / "configs" / "default.yaml", overrides))
    return backend


def test_check_refuses_a_time_above_maxtime_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"^train.time 12:00:00 is above partition short's "
                                          r"MaxTime 00:10:00; lower train.time or pass "
                                          r"--partition$"):
        _check(monkeypatch, ["slurm.partition=short", "ingest.time=5", "features.time=5"])
    backend = _check(monkeypatch, ["slurm.partition=short", "train.signal_seconds=60",
                                   *(f"{s}.time=00:10:00" for s in ("ingest", "features", "train"))])
    assert backend.facts is not None and backend.facts.cluster == "hpcpipe-2511"


def test_check_refuses_more_nodes_than_maxnodes(monkeypatch: pytest.MonkeyPatch) -> None:
    facts = recorded_facts("25.11")
    facts.partitions[0].max_nodes = 1
    monkeypatch.setattr(site, "for_layout_check", lambda: facts)
    with pytest.raises(ConfigError, match="train asks for 2 nodes, above partition debug's "
                                          "MaxNodes 1; change --gpus or --gpus-per-node"):
        SlurmBackend().check(load_config(None, ["train.gpus=4", "train.gpus_per_node=2"]))


@pytest.mark.parametrize("step", ["ingest", "features"])
def test_check_refuses_a_dask_step_on_more_nodes_or_cpus_than_the_partition_has(
        monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """Both Dask steps need ``nodes`` nodes of ceil(cpus / nodes) CPUs: the recorded cluster
    has two nodes of 32."""
    cpus = "--cpus" if step == "features" else "ingest.cpus"
    with pytest.raises(ConfigError, match=rf"^{step} asks for 8 CPUs on 3 node\(s\) \(3 per "
                                          rf"node\) but partition 'debug' has 2 node\(s\) with "
                                          rf"that many CPUs \(largest: 32\); lower {step}.nodes "
                                          rf"or {cpus}$"):
        _check(monkeypatch, [f"{step}.cpus=8", f"{step}.nodes=3", f"{step}.mem=1G"])
    with pytest.raises(ConfigError, match=rf"asks for 66 CPUs on 2 node\(s\) \(33 per node\) "
                                          rf".* has 0 node\(s\) .*; lower {cpus} or raise "
                                          rf"{step}.nodes$"):
        _check(monkeypatch, [f"{step}.cpus=66", f"{step}.nodes=2", f"{step}.mem=1G"])
    _check(monkeypatch, [f"{step}.cpus=64", f"{step}.nodes=2", f"{step}.mem=1G"])


def test_check_refuses_per_unit_memory_no_node_has(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"features.mem_per_cpu=4G x 32 CPUs is more memory "
                                          r"than any node .* --set features.mem_per_cpu=2000M"):
        _check(monkeypatch, ["features.mem_per_cpu=4G"])
    with pytest.raises(ConfigError, match=r"train.mem_per_gpu=40G x 2 GPUs .* "
                                          r"--set train.mem_per_gpu=32000M"):
        _check(monkeypatch, ["train.mem_per_gpu=40G"])
    _check(monkeypatch, [])  # the shipped defaults fit 32 CPUs / 64000 MB nodes
