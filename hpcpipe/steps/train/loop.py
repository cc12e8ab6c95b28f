"""The train step, read top to bottom: process group, data, model, resume, loop, predictions.

Called once per rank (``srun`` starts one task per GPU; locally one process). Only rank 0 writes
files and metrics and prints; every rank takes part in the collectives at the same points.

Global batch = batch_size * world_size * grad_accum. The sampler shuffles with a seed per epoch
and rank r takes every world_size-th sample, so a global batch holds the same samples whatever the
world size, and with dropout off (see model.py) a 4-rank run follows the 1-rank loss curve.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from hpcpipe.config import RunConfig
from hpcpipe.errors import InputError, SchedulerError
from hpcpipe.files import write_json
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.metrics import MetricsWriter
from hpcpipe.runtime import faulthooks
from hpcpipe.steps.train import checkpoint, data, dist, predict
from hpcpipe.steps.train.model import (
    autocast,
    autocast_dtype,
    build_model,
    count_params,
    model_dir,
    model_inputs,
    param_groups,
    product_embeddings,
)
from hpcpipe.steps.train.stop import SIGNALS, StopSignals

log = logging.getLogger(__name__)


def warmup_cosine(warmup: int, total: int, floor: float = 0.05):  # -> Callable[[int], float]
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 on log1p(count): the model learns the conditional median, robust to the heavy tail."""
    return F.l1_loss(pred.float(), target)


def run(layout: RunLayout, cfg: RunConfig, metrics: MetricsWriter) -> dict[str, Any] | None:
    """Train (resuming from ``train/checkpoints/last.pt`` if present) and write predictions.

    Returns rank 0's summary record (None on other ranks and when stopped by a signal that led
    to a requeue). Stopped by SIGUSR2/SIGTERM outside Slurm, it checkpoints and exits with
    128 + the signal number; inside Slurm, SIGUSR2 checkpoints and requeues the job.
    """
    env = dist.setup()
    # jobs/train.py installs the handlers first thing and keeps them until the process exits: a
    # USR2 that comes after the last step (Slurm's warning while predictions are written) must
    # not kill a run that has finished. Called in-process (tests), the loop cleans up after itself.
    owner = not SIGNALS.installed
    signals = SIGNALS.install()
    try:
        return _train(layout, cfg, metrics, env, signals)
    finally:
        if owner:
            signals.uninstall()
        dist.teardown()


def _train(layout: RunLayout, cfg: RunConfig, metrics: MetricsWriter, env: dist.DistEnv,
           signals: StopSignals) -> dict[str, Any] | None:
    t = cfg.train
    main, device = env.is_main, env.device
    cuda = device.type == "cuda"

    def barrier() -> None:
        dist.barrier(env)

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = autocast_dtype(device, t.precision)
    if t.precision == "fp16" and not cuda and main:
        log.info("precision fp16 needs CUDA; training in fp32 on %s", device)
    global_batch = t.batch_size * env.world_size * t.grad_accum

    # ---- data ---------------------------------------------------------------------------
    rows = data.load_rows(layout)
    split = data.split_by_time(rows, t.val_weeks, t.train_weeks)
    norm = data.Normalizer.fit(rows.numeric[split.train])
    if main:
        write_json(layout.train / "norm.json", {**norm.to_dict(), **split.describe()})
        log.info("%d feature rows of %d products: %s", len(rows), len(rows.products),
                 split.describe())
    numeric = norm.transform(rows.numeric)
    folder = model_dir(t.model)
    tokens = data.token_cache(layout.train, folder, rows, t.max_length, main, barrier)

    # ---- model --------------------------------------------------------------------------
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = build_model(folder, len(data.NUMERIC_NAMES), t.freeze_encoder,
                        t.grad_checkpointing).to(device)
    if t.freeze_encoder:  # encode every product once; batches then carry product indices
        model.set_text_table(product_embeddings(layout.train, folder, tokens, model, device,
                                                main, barrier))
    batch_tokens = None if t.freeze_encoder else tokens
    train_ds = data.ForecastDataset(split.train, numeric, rows.target, rows.product,
                                    batch_tokens)
    val_ds = data.ForecastDataset(split.val[env.rank::env.world_size], numeric, rows.target,
                                  rows.product, batch_tokens, with_rows=True)
    sampler = data.ResumableSampler(train_ds, env.world_size, env.rank, t.seed)
    loader = data.train_loader(train_ds, sampler, t.batch_size, t.num_workers, cuda)
    val_loader = data.eval_loader(val_ds, 4 * t.batch_size, 0, cuda)
    steps_per_epoch = len(train_ds) // env.world_size // t.batch_size // t.grad_accum
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise InputError(f"{len(train_ds)} training rows do not fill one global batch of "
                         f"{global_batch}; lower train.batch_size or train.grad_accum")
    total_steps = t.epochs * steps_per_epoch
    warmup = min(t.warmup_steps, total_steps // 5)

    optimizer = torch.optim.AdamW(param_groups(model, t.lr, t.encoder_lr, t.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    net = model
    if env.distributed:  # buffers (position ids, the text table) are constant: no syncing
        no_sync_buffers = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DDP).parameters
                           else {"broadcast_buffers": False})  # torch < 2.13
        net = DDP(model, device_ids=[device.index] if cuda else None, **no_sync_buffers)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # ---- resume -------------------------------------------------------------------------
    epoch, step_in_epoch, global_step = 0, 0, 0
    best: dict[str, Any] = {"val_smape": math.inf, "epoch": None}
    # Sums of the log interval a mid-epoch checkpoint fell into (loss, samples, tokens, data
    # wait, seconds), so that the first loss logged after a resume averages the whole interval.
    carried: list[float] | None = None
    if main:
        checkpoint.remove_stale_temporaries(layout.train)
    barrier()
    state = checkpoint.load(checkpoint.last_path(layout.train))
    if state is not None:
        checkpoint.load_model_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
        global_step, best = state["global_step"], state["best"]
        if state["sampler"]["global_batch"] != global_batch and main:
            log.warning("global batch changed from %d to %d since the checkpoint; the rest of "
                        "epoch %d is not the same sample order", state["sampler"]["global_batch"],
                        global_batch, epoch)
        if len(state["rng"]) == env.world_size:
            checkpoint.set_rng_state(state["rng"][env.rank])
        if step_in_epoch and state.get("log_interval"):
            # All-reduced at the next log line: rank 0 carries the sums of all ranks.
            carried = state["log_interval"] if main else [0.0, 0, 0, 0.0, 0.0]
        if main:
            log.info("resuming from %s at epoch %d, step %d of %d",
                     checkpoint.last_path(layout.train), epoch, step_in_epoch, steps_per_epoch)
        del state

    def save_last() -> None:
        """Every rank calls this (the RNG states are gathered); rank 0 writes."""
        rng = dist.all_gather_object(env, checkpoint.rng_state())
        log_interval = dist.all_reduce_sum(env, [loss_sum, seen, tokens_seen, wait])
        log_interval.append(time.perf_counter() - interval_start)
        if main:
            checkpoint.save(checkpoint.last_path(layout.train), {
                "model": checkpoint.model_state(model, t.freeze_encoder),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                "global_step": global_step, "steps_per_epoch": steps_per_epoch,
                "sampler": {"epoch": epoch, "seed": t.seed, "global_batch": global_batch,
                            "samples_seen": step_in_epoch * global_batch,
                            "world_size": env.world_size},
                "rng": rng, "log_interval": log_interval, "best": best, "norm": norm.to_dict(),
                "config": cfg.to_dict(),
            })
        barrier()

    if main:
        log.info("training %s parameters (%s in all) on %d rank(s), %s, global batch %d, "
                 "%d steps per epoch", f"{count_params(model, True):,}",
                 f"{count_params(model):,}", env.world_size, device, global_batch,
                 steps_per_epoch)
    val_baselines = predict.baselines(rows, split.val)
    baseline_smape = min(val_baselines["baseline_same_smape"],
                         val_baselines["baseline_roll4_smape"])
    train_samples, train_seconds = 0, 0.0
    step_delay_s = faulthooks.delay_s(faulthooks.STEP_DELAY_ENV)

    # ---- loop ---------------------------------------------------------------------------
    while epoch < t.epochs:
        sampler.set_epoch(epoch, start=step_in_epoch * t.grad_accum * t.batch_size)
        net.train()
        batches = iter(loader)
        bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch}",
                   disable=not main, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        loss_sum, seen, tokens_seen, wait, seconds = carried or [0.0, 0, 0, 0.0, 0.0]
        interval_start = time.perf_counter() - seconds
        carried = None
        while step_in_epoch < steps_per_epoch:
            for micro in range(t.grad_accum):
                t0 = time.perf_counter()
                batch = next(batches).to(device)
                wait += time.perf_counter() - t0
                syncing = micro == t.grad_accum - 1 or not env.distributed
                with contextlib.nullcontext() if syncing else net.no_sync():
                    with autocast(device, amp_dtype):
                        pred = net(*model_inputs(batch))
                    loss = loss_fn(pred, batch["target"])
                    scaler.scale(loss / t.grad_accum).backward()
                loss_sum += loss.item() * len(pred)
                seen += len(pred)
                if "attention_mask" in batch:
                    tokens_seen += int(batch["attention_mask"].sum())
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            global_step += 1
            step_in_epoch += 1
            bar.update(1)
            if step_delay_s:
                time.sleep(step_delay_s)  # a test hook (hpcpipe/faulthooks.py)

            if global_step % t.log_every == 0:
                loss_sum, seen, tokens_seen, wait = dist.all_reduce_sum(
                    env, [loss_sum, seen, tokens_seen, wait])
                elapsed = time.perf_counter() - interval_start
                train_samples += seen
                train_seconds += elapsed
                if main:
                    record = metrics.write(
                        "train", epoch=epoch, global_step=global_step, loss=loss_sum / seen,
                        lr=optimizer.param_groups[-1]["lr"], samples_per_s=seen / elapsed,
                        tokens_per_s=tokens_seen / elapsed if not t.freeze_encoder else None,
                        gpu_mem_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
                        data_wait_frac=wait / env.world_size / elapsed)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                loss_sum, seen, tokens_seen, wait = 0.0, 0, 0, 0.0
                interval_start = time.perf_counter()

            usr2, term = dist.agreed_stop(env, signals)
            if usr2 or term:
                bar.close()
                del batches, loader  # end the loader's workers before Slurm signals them
                save_last()
                return _stop(env, signals, usr2, epoch, step_in_epoch, layout)
            if global_step % t.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                save_last()
        bar.close()
        del batches

        # ---- evaluate, keep the best, checkpoint the epoch --------------------------------
        row_ids, log_pred = predict.predict_log(model, val_loader, device, amp_dtype)
        counts, true = predict.to_counts(log_pred), rows.target[row_ids]
        abs_err, smape_sum, n = dist.all_reduce_sum(env, [
            float(np.abs(counts - true).sum()), float(predict.smape_terms(counts, true).sum()),
            float(len(true))])
        val_smape = smape_sum / n
        improvement = 100.0 * (baseline_smape - val_smape) / baseline_smape
        if main:
            metrics.write("eval", epoch=epoch, val_mae=abs_err / n, val_smape=val_smape,
                          **val_baselines, improvement_pct=improvement)
            log.info("epoch %d: val SMAPE %.4f (best baseline %.4f, %+.1f%%), val MAE %.3f",
                     epoch, val_smape, baseline_smape, improvement, abs_err / n)
        if val_smape < best["val_smape"]:
            best = {"val_smape": val_smape, "epoch": epoch, "val_mae": abs_err / n,
                    "improvement_pct": improvement}
            if main:
                checkpoint.save(checkpoint.best_path(layout.train), {
                    "model": checkpoint.model_state(model, t.freeze_encoder),
                    "model_dir": str(folder), "freeze_encoder": t.freeze_encoder,
                    "max_length": t.max_length, "norm": norm.to_dict(), "epoch": epoch,
                    "best": best, "config": cfg.to_dict(),
                })
        epoch, step_in_epoch = epoch + 1, 0
        save_last()

    # ---- summary and predictions (rank 0) -----------------------------------------------
    summary = None
    if main:
        best_model, best_state = predict.load_best(layout.train, device)
        predict.predict_latest(layout, rows, best_model, best_state, device, t.precision)
        summary = metrics.write(
            "summary", best_epoch=best["epoch"], best_val_smape=best["val_smape"],
            best_baseline_smape=baseline_smape, improvement_pct=best.get("improvement_pct"),
            checkpoint=str(checkpoint.best_path(layout.train)),
            samples_per_s=train_samples / train_seconds if train_seconds else None,
            predictions=str(layout.predictions), world_size=env.world_size,
            global_batch=global_batch)
    barrier()
    return summary


def _stop(env: dist.DistEnv, signals: StopSignals, usr2: bool, epoch: int, step: int,
          layout: RunLayout) -> None:
    """After the checkpoint of a signalled stop: requeue inside Slurm, else exit non-zero."""
    name = "SIGUSR2" if usr2 else "SIGTERM"
    where = checkpoint.last_path(layout.train)
    job_id = dist.slurm_job_id()
    if usr2 and job_id:
        ok = 1.0
        if env.is_main:
            log.warning("%s at epoch %d step %d: checkpoint saved to %s; requeueing job %s",
                        name, epoch, step, where, job_id)
            try:
                dist.requeue(job_id)
            except SchedulerError as exc:
                log.error("requeue of job %s failed (%s); submit the train step again to "
                          "resume from %s", job_id, exc, where)
                ok = 0.0
        (ok,) = dist.all_reduce_max(env, [ok])
        if ok:
            dist.wait_to_be_ended(signals)  # Slurm ends the job for the requeue
            if env.is_main:
                log.warning("job %s requeued: it resumes from %s when Slurm starts it again",
                            job_id, where)
            raise SystemExit(0)  # not "finished": jobmain must not report the step as done
    if env.is_main:
        log.error("stopped by %s at epoch %d step %d; checkpoint saved to %s. Run the train "
                  "step again to resume from it.", name, epoch, step, where)
    raise SystemExit(128 + (12 if usr2 else 15))
