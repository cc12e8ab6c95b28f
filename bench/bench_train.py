"""Throughput of the train step: the model's training rate and the data loader's rate alone.

    python bench/bench_train.py                      # CPU: loader vs model, default config
    python bench/bench_train.py --device cuda        # GPU: fp16 and bf16 samples/s, tokens/s, MFU

The loader is measured exactly as training builds it (ForecastDataset, ResumableSampler,
DataLoader with train.num_workers) on synthetic rows, iterated without a model. The model is
measured twice: on one batch kept on the device (forward, backward, fused AdamW step: the upper
bound, ``samples_per_s``), and in the real training loop (``loop_samples_per_s``: the recipe's
own epoch loop, ``TrainRecipe._train_epoch``, fed by the real loader with its workers, with its
stop checks; the device synchronized only at the start and end of the timed steps).
``loop_vs_resident`` is their ratio (the goal: within 10%). The GPU's peak memory is reset
before each case, so ``gpu_mem_bytes`` is that case's own.
Two models: the default configuration (frozen encoder, pooled text cached per product, so the
step trains the head only) and encoder fine-tuning (``freeze_encoder=false``) at ``--seq-len``.
MFU = FLOPs per token * tokens/s / peak dense FLOP/s of the GPU (table below, or --peak-tflops),
with FLOPs per token = 6 * non-embedding parameters + 12 * layers * width * sequence length
(nanoGPT's estimate); ``mfu_all_params`` uses 6 * all parameters.
Nothing is downloaded: ``--model`` is a local folder (default: the shipped all-MiniLM-L6-v2).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hpcpipe.config import TrainConfig
from hpcpipe.steps.train import data, loaders
from hpcpipe.steps.train.model import (
    autocast,
    autocast_dtype,
    build_model,
    count_params,
    default_model_dir,
    model_inputs,
    param_groups,
    precision_name,
)
from hpcpipe.steps.train.recipe import TrainRecipe, fused_adamw_supported, loss_fn

#: Peak dense bf16/fp16 tensor FLOP/s by GPU name (substring, checked in order).
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
               ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0), ("V100", 125.0))


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def synthetic_dataset(n_rows: int, n_products: int, seq_len: int, frozen: bool,
                      seed: int = 0) -> data.ForecastDataset:
    """Rows like the real ones: numeric features, product index, tokens unless ``frozen``."""
    rng = np.random.default_rng(seed)
    numeric = rng.standard_normal((n_rows, len(data.NUMERIC_NAMES)), dtype=np.float32)
    target = rng.poisson(2.0, n_rows).astype(np.float64)
    product = rng.integers(0, n_products, n_rows).astype(np.int32)
    if frozen:
        return data.ForecastDataset(np.arange(n_rows), numeric, target, product)
    lengths = np.full(n_products, seq_len, dtype=np.int32)  # full length: the costly case
    ids = rng.integers(1000, 29000, (n_products, seq_len)).astype(np.int32)
    tokens = data.Tokens(ids, lengths, Path("-"), "bench")
    return data.ForecastDataset(np.arange(n_rows), numeric, target, product, tokens=tokens)


def loader_rate(ds: data.ForecastDataset, batch_size: int, num_workers: int, cuda: bool,
                seconds: float) -> float:
    """Samples/s the training DataLoader delivers with no model consuming them."""
    sampler = data.ResumableSampler(ds, 1, 0, seed=0)
    loader = loaders.train_loader(ds, sampler, batch_size, num_workers, cuda)
    n, start, epoch = 0, None, 0
    while True:
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i == 2 and start is None:  # workers started and warm
                start = time.perf_counter()
            elif start is not None:
                n += len(batch)
                if time.perf_counter() - start > seconds:
                    return n / (time.perf_counter() - start)
        epoch += 1


def model_rate(folder: Path, freeze: bool, device: torch.device, precision: str,
               batch_size: int, seq_len: int, steps: int, grad_checkpointing: bool) -> dict:
    """Training steps on one resident batch: samples/s, tokens/s, parameters."""
    fresh_peak_memory(device)
    torch.manual_seed(0)
    model = build_model(folder, len(data.NUMERIC_NAMES), freeze, grad_checkpointing).to(device)
    model.train()
    n_products = 64
    if freeze:
        model.set_text_table(torch.randn(n_products, int(model.encoder.config.hidden_size)))
    ds = synthetic_dataset(batch_size, n_products, seq_len, freeze)
    batch = ds.__getitems__(list(range(batch_size))).to(device)
    opt = torch.optim.AdamW(param_groups(model, 1e-3, 3e-5, 0.01),
                            fused=fused_adamw_supported(device))
    dtype = autocast_dtype(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> None:
        with autocast(device, dtype):
            pred = model(*model_inputs(batch))
        scaler.scale(loss_fn(pred, batch["target"])).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    samples = batch_size * steps / seconds
    tokens = 0.0 if freeze else samples * seq_len
    embedding = sum(m.weight.numel() for m in model.modules()
                    if isinstance(m, torch.nn.Embedding))
    enc = model.encoder.config
    return {"freeze_encoder": freeze, "precision": precision_name(dtype),
            "batch_size": batch_size, "seq_len": None if freeze else seq_len,
            "samples_per_s": samples, "tokens_per_s": tokens or None,
            "trainable_params": count_params(model, True), "params": count_params(model),
            "non_embedding_params": count_params(model) - embedding,
            # nanoGPT's estimate: 6N per token plus attention's 12 * layers * width * length
            "flops_per_token": None if freeze else 6 * (count_params(model) - embedding)
            + 12 * enc.num_hidden_layers * enc.hidden_size * seq_len,
            "gpu_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else None}


def fresh_peak_memory(device: torch.device) -> None:
    """Free what earlier cases left and restart the peak, so each case reports its own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def loop_rate(folder: Path, freeze: bool, device: torch.device, precision: str,
              batch_size: int, seq_len: int, steps: int, num_workers: int, rows: int,
              products: int, compile_model: bool = False) -> dict:
    """Samples/s of the recipe's own training loop (``_train_epoch``: loader with workers,
    micro-steps, stop checks), timed over ``steps`` steps after 3 warm-up steps."""
    from hpcpipe.steps.train import dist
    from hpcpipe.steps.train.recipe import Interval
    from hpcpipe.steps.train.stop import StopSignals

    fresh_peak_memory(device)
    cuda = device.type == "cuda"
    warm = 3
    r = TrainRecipe.__new__(TrainRecipe)  # the loop's parts, without a run folder
    r.t = TrainConfig(batch_size=batch_size, num_workers=num_workers, precision=precision,
                      freeze_encoder=freeze, max_length=seq_len, epochs=1, log_every=10**9,
                      checkpoint_every=10**9, compile=compile_model)
    r.world, r.device = dist.DistEnv(device=device), device
    r.amp_dtype = autocast_dtype(device, precision)
    r.signals, r.step_delay_s, r.interval = StopSignals(), 0.0, Interval()
    r.epoch = r.step_in_epoch = r.global_step = 0
    r._resumed_interval = None
    r.steps_per_epoch = warm + steps
    ds = synthetic_dataset(max(rows, batch_size * (warm + steps)), products, seq_len, freeze)
    r.sampler = data.ResumableSampler(ds, 1, 0, seed=0)
    r.loader = loaders.train_loader(ds, r.sampler, batch_size, num_workers, cuda)
    torch.manual_seed(0)
    r.model = build_model(folder, len(data.NUMERIC_NAMES), freeze).to(device)
    if freeze:
        r.model.set_text_table(torch.randn(products, int(r.model.encoder.config.hidden_size)))
    r.trainable = [p for p in r.model.parameters() if p.requires_grad]
    r.net, r.ddp = (torch.compile(r.model) if compile_model else r.model), None
    r._setup_optimizer()
    times: list[float] = []
    real_step = r._train_step

    def timed_step() -> None:
        if r.global_step in (warm, warm + steps - 1) or not times:
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter())
        real_step()

    r._train_step = timed_step  # type: ignore[method-assign]
    r._train_epoch()
    if cuda:
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    r._end_loader()
    start = times[1] if len(times) > 1 else times[0]
    return {"freeze_encoder": freeze, "precision": precision_name(r.amp_dtype),
            "loop_samples_per_s": batch_size * steps / (end - start),
            "loop_gpu_mem_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}


def main(argv: list[str] | None = None) -> dict:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", type=Path, default=None, help="local HF model folder")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per text (default 256 on cuda, train.max_length on cpu)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--ft-batch-size", type=int, default=None,
                   help="batch for encoder fine-tuning (default 64 on cuda, 16 on cpu)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=defaults.num_workers)
    p.add_argument("--loader-seconds", type=float, default=5.0)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--products", type=int, default=20_000)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s when the GPU is not in the table")
    p.add_argument("--compile", action="store_true", help="torch.compile in the loop case")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device here")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cuda = device.type == "cuda"
    folder = args.model or default_model_dir()
    seq_len = args.seq_len or (256 if cuda else defaults.max_length)
    ft_batch = args.ft_batch_size or (64 if cuda else 16)
    steps = args.steps or (50 if cuda else 10)

    result: dict = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
                    "torch_threads": torch.get_num_threads(), "model": str(folder),
                    "num_workers": args.num_workers}
    result["loader_frozen_samples_per_s"] = loader_rate(
        synthetic_dataset(args.rows, args.products, seq_len, True), args.batch_size,
        args.num_workers, cuda, args.loader_seconds)
    result["loader_tokens_samples_per_s"] = loader_rate(
        synthetic_dataset(args.rows, args.products, seq_len, False), ft_batch,
        args.num_workers, cuda, args.loader_seconds)

    precisions = ("fp16", "bf16") if cuda else ("fp32",)
    runs = []
    for precision in precisions:
        for freeze, batch, n in ((True, args.batch_size, steps * 5), (False, ft_batch, steps)):
            r = model_rate(folder, freeze, device, precision, batch, seq_len, n,
                           args.grad_checkpointing and not freeze)
            r.update({k: v for k, v in loop_rate(
                folder, freeze, device, precision, batch, seq_len, n, args.num_workers,
                args.rows, args.products, args.compile).items() if k.startswith("loop_")})
            r["loop_vs_resident"] = r["loop_samples_per_s"] / r["samples_per_s"]
            runs.append(r)
    peak = peak_flops(result["device"], args.peak_tflops) if cuda else None
    for r in runs:
        if r["tokens_per_s"] and peak:
            # The brief's 6 * params counts the embedding tables, which do no matmuls; the
            # nanoGPT-style figure (mfu) is the honest one, mfu_all_params is shown beside it.
            r["mfu_all_params"] = 6 * r["params"] * r["tokens_per_s"] / peak
            r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak
        loader = result["loader_frozen_samples_per_s" if r["freeze_encoder"]
                        else "loader_tokens_samples_per_s"]
        r["loader_headroom"] = loader / r["samples_per_s"]
    result["train"] = runs
    result["peak_flops"] = peak
    result["loader_ok"] = all(r["loader_headroom"] >= 5 for r in runs)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
