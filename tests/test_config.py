"""Strict configuration: every bad value is refused naming the key, before anything is queued."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcpipe.config import (
    STEPS,
    RunConfig,
    check_paths,
    load_config,
    parse_override,
    time_limit_seconds,
    train_nodes,
)
from hpcpipe.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["default.yaml", "local.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, RunConfig) and cfg.steps == list(STEPS)


def test_overrides_are_typed_yaml_values() -> None:
    cfg = load_config(None, ["train.epochs=5", "train.lr=1e-3", "slurm.setup=[module load x]",
                             "train.freeze_encoder=true", "ingest.time=90"])
    assert cfg.train.epochs == 5 and cfg.train.lr == 1e-3 and cfg.train.freeze_encoder is True
    assert cfg.slurm.setup == ["module load x"] and cfg.ingest.time == "90"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown config key 'train.epoch'; did you mean 'epochs'"),
        ("bogus.x=1", "unknown config key 'bogus'"),
        ("train.epochs=three", "train.epochs: expected an integer, got 'three'"),
        ("train.epochs=true", "train.epochs: expected an integer"),
        ("train.gpus=0", "train.gpus must be a positive integer, got 0"),
        ("features.cpus=-4", "features.cpus must be a positive integer, got -4"),
        ("train.time=2h", "train.time: '2h' is not a Slurm time limit"),
        ("features.mem=lots", "features.mem: 'lots' is not a memory size"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of auto, bf16, fp16, fp32"),
        ("train.gpus=3", "train.gpus=3 does not fill whole nodes"),
        ("steps=[ingest,bake]", "steps: ['ingest', 'bake']"),
        ("name=../../etc", "name: '../../etc' must start with a letter or digit"),
        ("slurm.partition=gpu;rm -rf /", "slurm.partition"),
        ("slurm.account=$(whoami)", "slurm.account"),
        ("slurm.extra_sbatch=[--comment=`id`]", "slurm.extra_sbatch[0]"),
        ("slurm.extra_sbatch=[mail]", "slurm.extra_sbatch[0]"),
        ("train", "expected key=value"),
        ("train.time=5", "train.signal_seconds=300 is not less than train.time=5 (300 s)"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize(("limit", "seconds"), [
    ("90", 5400), ("1:30", 90), ("01:30:00", 5400), ("2-0", 172800), ("1-12:30", 131400),
    ("1-00:00:10", 86410), ("0", 0)])
def test_slurm_time_limits_in_seconds(limit: str, seconds: int) -> None:
    assert time_limit_seconds(limit) == seconds


def test_signal_seconds_fit_the_time_limit() -> None:
    assert load_config(None, ["train.time=6", "train.signal_seconds=300"]).train.time == "6"
    # 0 would ask Slurm for no limit at all: refused (tests/test_checks_before_queueing.py)
    with pytest.raises(ConfigError, match="train.time: '0' asks Slurm for no time limit"):
        load_config(None, ["train.time=0"])
    # `submit --time 5 --steps ingest,features` sets train.time too; no train job, no refusal
    assert load_config(None, ["steps=[ingest,features]", "train.time=5"]).train.time == "5"


def test_newline_in_setup_line_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"slurm.setup\[0\]: one shell line"):
        load_config(None, ['slurm.setup=["module load x\\nrm -rf ~"]'])


def test_bad_yaml_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)


def test_paths_are_checked_before_queueing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.reviews\[0\]: .*does not exist"):
        check_paths(load_config(None, [f"data.reviews=[{tmp_path}/nope.jsonl]"]))
    (tmp_path / "r.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="data.metadata: the product metadata file is required"):
        check_paths(load_config(None, [f"data.reviews=[{tmp_path}/r.jsonl]"]))
    with pytest.raises(ConfigError, match="train.model: .* is not a local Hugging Face model"):
        check_paths(load_config(None, [f"train.model={tmp_path}/no-model"]))


def test_parse_override_nests_keys() -> None:
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(("gpus", "per_node", "expected"), [(1, 2, (1, 1)), (2, 2, (1, 2)),
                                                            (4, 2, (2, 2)), (8, 4, (2, 4))])
def test_train_nodes_is_ceil_of_gpus_over_gpus_per_node(gpus: int, per_node: int,
                                                        expected: tuple[int, int]) -> None:
    cfg = load_config(None, [f"train.gpus={gpus}", f"train.gpus_per_node={per_node}"])
    assert train_nodes(cfg.train) == expected


def test_a_step_memory_key_set_over_another_layer_replaces_it(tmp_path: Path) -> None:
    """default.yaml asks memory per CPU/GPU; `--set features.mem=8G` (summarize's advice after
    an out-of-memory) replaces it, as a later sbatch option would, instead of being refused."""
    default = Path(__file__).parents[1] / "configs" / "default.yaml"
    cfg = load_config(default, ["features.mem=8G", "train.mem=30G"])
    assert (cfg.features.mem, cfg.features.mem_per_cpu) == ("8G", None)
    assert (cfg.train.mem, cfg.train.mem_per_gpu) == ("30G", None)
    assert load_config(default, []).ingest.mem_per_cpu == "1900M"
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text("features:\n  mem: 8G\n")
    cfg = load_config(fixed, ["features.mem_per_cpu=2G"])  # the later layer wins here too
    assert (cfg.features.mem, cfg.features.mem_per_cpu) == (None, "2G")


@pytest.mark.parametrize("where", ["file", "set"])
def test_mem_and_its_per_unit_key_in_one_layer_are_refused(tmp_path: Path, where: str) -> None:
    both = tmp_path / "both.yaml"
    both.write_text("train:\n  mem: 8G\n  mem_per_gpu: 4G\n")
    with pytest.raises(ConfigError, match=r"train.mem and train.mem_per_gpu are both set in .*"
                                          r"they exclude each other .* --set train.mem_per_gpu=null"):
        if where == "file":
            load_config(both)
        else:
            load_config(None, ["train.mem=8G", "train.mem_per_gpu=4G"])
    with pytest.raises(ConfigError, match="ingest.mem_per_cpu: 'lots' is not a memory size"):
        load_config(None, ["ingest.mem_per_cpu=lots"])
