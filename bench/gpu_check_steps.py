"""The parts of bench/gpu_check.sh written in Python (one subcommand each; see that script).

    model OUT_DIR --layers L --hidden H --heads A --ff F --vocab V --max-pos P
        a BERT-architecture encoder of the given size with random weights and the shipped
        MiniLM tokenizer, saved like any local model folder (nothing downloaded)
    folder SOURCE_RUN DEST KEY=VALUE...
        a run folder that shares SOURCE_RUN's ingest and features (symlinks) with its config and
        the given train.* overrides, for the real train job entry
    resume SOURCE_RUN DEST --precisions bf16,fp16,bf16 --every N --out JSON
        train in legs, each in the next precision, each stopped (a crash) after its first
        checkpoint but the last: the loss scaler state and global step of each leg
    figures OUT_DIR
        figures.md and figures.json from the results folder
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def cmd_model(args: argparse.Namespace) -> None:
    import torch
    from transformers import BertConfig, BertModel

    from hpcpipe.steps.train.model import default_model_dir, load_tokenizer

    tok = load_tokenizer(default_model_dir())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=max(args.vocab, tok.vocab_size), hidden_size=args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        intermediate_size=args.ff, max_position_embeddings=args.max_pos)
    model = BertModel(config)
    model.save_pretrained(args.dir)
    tok.save_pretrained(args.dir)
    print(json.dumps({"model": str(args.dir), "params": sum(p.numel() for p in
                                                         model.parameters())}))


def make_folder(source: Path, dest: Path, overrides: dict[str, Any]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("features", "ingest"):
        link = dest / name
        if not link.exists():
            link.symlink_to((source / name).resolve())
    cfg = yaml.safe_load((source / "config.yaml").read_text())
    cfg.setdefault("train", {}).update(overrides)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dest


def _overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.removeprefix("train.")] = yaml.safe_load(value)
    return out


def cmd_folder(args: argparse.Namespace) -> None:
    print(make_folder(args.source, args.dest, _overrides(args.set)))


class Stop(Exception):
    """The stand-in for a job that ended after a checkpoint (a time limit, a requeue)."""


def cmd_resume(args: argparse.Namespace) -> None:
    from hpcpipe.config import load_config
    from hpcpipe.run.layout import RunLayout
    from hpcpipe.run.metrics import MetricsWriter
    from hpcpipe.steps.train import checkpoint
    from hpcpipe.steps.train import run as train_run

    precisions = args.precisions.split(",")
    legs = []
    real_save = checkpoint.save
    for i, precision in enumerate(precisions):
        last = i == len(precisions) - 1
        folder = make_folder(args.source, args.dest, {
            **_overrides(args.set), "precision": precision,
            "checkpoint_every": args.every, "max_steps_per_epoch": args.every * len(precisions)})
        layout = RunLayout(folder)
        cfg = load_config(layout.config)
        started = checkpoint.load(checkpoint.last_path(layout.train))

        def save(path: Path, state: dict, _first: int = (started or {}).get("global_step", 0),
                 _last: bool = last) -> Path:
            out = real_save(path, state)
            if not _last and path.name == "last.pt" and state["global_step"] > _first:
                raise Stop(state["global_step"])
            return out

        checkpoint.save = save  # type: ignore[assignment]
        error = None
        try:
            train_run(layout, cfg, MetricsWriter(layout.metrics, "train"))
        except Stop:
            pass
        except Exception as exc:  # noqa: BLE001 - the check reports it
            error = f"{type(exc).__name__}: {exc}"
        finally:
            checkpoint.save = real_save  # type: ignore[assignment]
        state = checkpoint.load(checkpoint.last_path(layout.train)) or {}
        scaler = state.get("scaler") or {}
        legs.append({"precision": precision, "resumed_from_step": (started or {}).get(
            "global_step"), "saved_step": state.get("global_step"), "error": error,
            "scaler_scale": float(scaler["scale"]) if "scale" in scaler else None})
        if error:
            break
    ok = all(leg["error"] is None for leg in legs) and len(legs) == len(precisions)
    result = {"ok": ok, "legs": legs}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    if not ok:
        sys.exit(1)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cmd_figures(args: argparse.Namespace) -> None:
    from hpcpipe.run import gpu_samples
    from hpcpipe.run.metrics import read_metrics

    out: Path = args.dir
    env = _read_json(out / "env.json") or {}
    bench = _read_json(out / "bench_train.json") or {}
    resume = _read_json(out / "resume.json") or {}
    figures: dict[str, Any] = {"device": env.get("device"), "torch": env.get("torch"),
                               "cuda": env.get("cuda"), "benchmark": [], "train_step": [],
                               "gpu_samples": [], "resume_ok": resume.get("ok")}
    lines = [f"# GPU check: {env.get('device', '?')}", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, written by bench/gpu_check.sh",
             "", "## Throughput benchmark (bench/bench_train.py)", "",
             "| encoder | precision | batch x length | resident samples/s | loop samples/s | "
             "loop / resident | tokens/s | MFU | peak memory |", "|---|---|---|---|---|---|---|---|---|"]
    for r in bench.get("train", []):
        figures["benchmark"].append(r)
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        mem = f"{r['gpu_mem_bytes'] / 2**30:.1f} GiB" if r.get("gpu_mem_bytes") else "-"
        tok = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        lines.append(f"| {'frozen' if r['freeze_encoder'] else 'fine-tuned'} | {r['precision']} "
                     f"| {r['batch_size']} x {r.get('seq_len') or '-'} | "
                     f"{r['samples_per_s']:,.1f} | {r.get('loop_samples_per_s', 0):,.1f} | "
                     f"{r.get('loop_vs_resident', 0):.2f} | {tok} | {mfu} | {mem} |")
    lines += ["", "## The real train step (hpcpipe.jobs.train on the synthetic sample)", "",
              "| run | precision | steps logged | mean samples/s | data wait | peak memory |",
              "|---|---|---|---|---|---|"]
    for folder in sorted(p for p in out.glob("train-*") if p.is_dir()):
        recs = [m for m in read_metrics(folder / "metrics.jsonl") if m.get("kind") == "train"]
        rates = [m["samples_per_s"] for m in recs[1:] if m.get("samples_per_s")]
        waits = [m["data_wait_frac"] for m in recs[1:] if m.get("data_wait_frac") is not None]
        mem = max((m.get("gpu_mem_bytes") or 0 for m in recs), default=0)
        row = {"run": folder.name, "steps_logged": len(recs),
               "samples_per_s": sum(rates) / len(rates) if rates else None,
               "data_wait_frac": sum(waits) / len(waits) if waits else None,
               "gpu_mem_bytes": mem or None}
        figures["train_step"].append(row)
        lines.append(f"| {folder.name} | {folder.name.removeprefix('train-')} | {len(recs)} | "
                     f"{row['samples_per_s'] or 0:,.1f} | {100 * (row['data_wait_frac'] or 0):.0f}% "
                     f"| {mem / 2**30:.1f} GiB |")
        for g in gpu_samples.summarize(gpu_samples.read_samples(folder / "train")):
            figures["gpu_samples"].append({"run": folder.name, **g})
    lines += ["", "## GPU samples (the train job's NVML sampler)", ""]
    if figures["gpu_samples"]:
        lines += ["| run | GPU | samples | mean utilisation | peak memory |", "|---|---|---|---|---|"]
        for g in figures["gpu_samples"]:
            lines.append(f"| {g['run']} | {g['host']}:{g['index']} {g['name']} | {g['samples']} | "
                         f"{g['util_mean']:.0f}% | {g['mem_peak'] / 2**30:.1f} GiB |")
    else:
        lines.append("none (no GPU, or nvidia-ml-py absent: see nvidia-smi-samples.csv)")
    lines += ["", "## Resume across precisions", "", "```", json.dumps(resume, indent=2), "```"]
    (out / "figures.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    (out / "figures.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("dir", type=Path)
    for name, default in (("layers", 6), ("hidden", 768), ("heads", 12), ("ff", 3072),
                          ("vocab", 50265), ("max-pos", 514)):
        m.add_argument(f"--{name}", type=int, default=default)
    f = sub.add_parser("folder")
    f.add_argument("source", type=Path)
    f.add_argument("dest", type=Path)
    f.add_argument("set", nargs="*")
    r = sub.add_parser("resume")
    r.add_argument("source", type=Path)
    r.add_argument("dest", type=Path)
    r.add_argument("--precisions", default="bf16,fp16,bf16")
    r.add_argument("--every", type=int, default=10)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--set", nargs="*", default=[])
    g = sub.add_parser("figures")
    g.add_argument("dir", type=Path)
    args = p.parse_args(argv)
    {"model": cmd_model, "folder": cmd_folder, "resume": cmd_resume,
     "figures": cmd_figures}[args.cmd](args)


if __name__ == "__main__":
    main()
