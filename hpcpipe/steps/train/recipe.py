"""The train step as a recipe: set up data, model and optimiser; load the checkpoint; train
(evaluating and checkpointing each epoch) until done or stopped; write predictions.

Run once per rank (``srun`` starts one task per GPU; locally one process). Only rank 0 writes
files and metrics and prints; every rank takes part in the collectives at the same points.

Global batch = batch_size * world_size * grad_accum. The sampler shuffles with a seed per epoch
and rank r takes every world_size-th sample, so a global batch holds the same samples whatever the
world size, and with dropout off (see model.py) a 4-rank run follows the 1-rank loss curve.

``train()`` returns why it stopped (:class:`~hpcpipe.steps.train.stop.StopReason`) with the
checkpoint saved; what a stop means for the job (exit code, requeue) is the job entry's to decide
(``hpcpipe.steps.train.run_job``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm  # type: ignore[import-untyped]

from hpcpipe import faulthooks
from hpcpipe.config import RunConfig
from hpcpipe.errors import InputError
from hpcpipe.files import write_json
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.metrics import MetricsWriter
from hpcpipe.runtime.env import JobEnvironment
from hpcpipe.steps.train import checkpoint, data, dist, predict
from hpcpipe.steps.train.model import (
    Forecaster,
    autocast,
    autocast_dtype,
    build_model,
    count_params,
    model_dir,
    model_inputs,
    param_groups,
)
from hpcpipe.steps.train.stop import StopReason, StopSignals

log = logging.getLogger(__name__)


def warmup_cosine(warmup: int, total: int, floor: float = 0.05) -> Callable[[int], float]:
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


@dataclass
class Interval:
    """Sums over the metrics log interval in progress, on this rank.

    One all-reduce at the log line turns them into the job's numbers. A mid-epoch checkpoint
    stores the job's sums and the seconds so far (``log_interval``), so the first line logged
    after a resume averages the whole interval, not just the part after the restart.
    """

    loss_sum: float = 0.0  # per-sample loss, summed
    samples: int = 0
    tokens: int = 0
    data_wait: float = 0.0  # seconds spent waiting for the loader
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def resumed(cls, saved: list[float]) -> Interval:
        """The interval a checkpoint's ``log_interval`` was saved in, continued from now."""
        loss_sum, samples, tokens, data_wait, seconds = saved
        return cls(loss_sum, int(samples), int(tokens), data_wait, time.perf_counter() - seconds)

    def add(self, loss: torch.Tensor, samples: int, tokens: int) -> None:
        self.loss_sum += loss.item() * samples
        self.samples += samples
        self.tokens += tokens

    def sums(self) -> list[float]:
        return [self.loss_sum, self.samples, self.tokens, self.data_wait]

    def seconds(self) -> float:
        return time.perf_counter() - self.start


class TrainRecipe:
    """Setup, resume, train, evaluate and checkpoint for one rank of the train step.

    ``setup()``, ``load_checkpoint()``, ``train()`` (a :class:`StopReason`), then when it is
    DONE ``summarize()``; ``cleanup()`` in any case. The progress (epoch, step, best score) lives
    on the recipe: ``save_checkpoint`` writes it and ``load_checkpoint`` restores it.
    """

    # Set by setup(), in this order.
    world: dist.DistEnv
    device: torch.device
    amp_dtype: torch.dtype | None
    global_batch: int
    rows: data.Rows
    split: data.Split
    norm: data.Normalizer
    folder: Path
    tokens: data.Tokens
    val_baselines: dict[str, float]
    baseline_smape: float
    sampler: data.ResumableSampler
    loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int
    model: Forecaster
    net: torch.nn.Module  # the model, or DDP around it: what the training step calls
    ddp: DDP | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    trainable: list[torch.nn.Parameter]

    def __init__(self, layout: RunLayout, cfg: RunConfig, metrics: MetricsWriter,
                 job: JobEnvironment, signals: StopSignals) -> None:
        self.layout, self.cfg, self.t, self.metrics = layout, cfg, cfg.train, metrics
        self.job, self.signals = job, signals
        # Progress: restored by load_checkpoint, saved by save_checkpoint.
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best: dict[str, Any] = {"val_smape": math.inf, "epoch": None}
        self.interval = Interval()
        self._resumed_interval: list[float] | None = None  # for the first epoch after a resume
        # Throughput over the logged intervals of this start, for the summary.
        self.samples_logged, self.seconds_logged = 0.0, 0.0
        self.step_delay_s = faulthooks.delay_s(faulthooks.STEP_DELAY_ENV)
        self.summary: dict[str, Any] | None = None

    @property
    def main(self) -> bool:
        return self.world.is_main

    def barrier(self) -> None:
        dist.barrier(self.world)

    # ---- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        self._setup_distributed()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()

    def _setup_distributed(self) -> None:
        t = self.t
        self.world = dist.setup(self.job)
        self.device = self.world.device
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.amp_dtype = autocast_dtype(self.device, t.precision)
        if t.precision == "fp16" and self.device.type != "cuda" and self.main:
            log.info("precision fp16 needs CUDA; training in fp32 on %s", self.device)
        self.global_batch = t.batch_size * self.world.world_size * t.grad_accum

    def _setup_data(self) -> None:
        t, world = self.t, self.world
        self.rows = rows = data.load_rows(self.layout)
        self.split = split = data.split_by_time(rows, t.val_weeks, t.train_weeks)
        self.norm = data.Normalizer.fit(rows.numeric[split.train])
        if self.main:
            write_json(self.layout.train / "norm.json", {**self.norm.to_dict(), **split.describe()})
            log.info("%d feature rows of %d products: %s", len(rows), len(rows.products),
                     split.describe())
        self.folder = model_dir(t.model)
        self.tokens = data.token_cache(self.layout.train, self.folder, rows, t.max_length,
                                       self.main, self.barrier)
        self.val_baselines = predict.baselines(rows, split.val)
        self.baseline_smape = min(self.val_baselines["baseline_same_smape"],
                                  self.val_baselines["baseline_roll4_smape"])

        numeric = self.norm.transform(rows.numeric)
        # A frozen encoder's output is looked up per product on the device: no tokens in batches.
        batch_tokens = None if t.freeze_encoder else self.tokens
        train_ds = data.ForecastDataset(split.train, numeric, rows.target, rows.product,
                                        batch_tokens)
        val_ds = data.ForecastDataset(split.val[world.rank::world.world_size], numeric,
                                      rows.target, rows.product, batch_tokens, with_rows=True)
        cuda = self.device.type == "cuda"
        self.sampler = data.ResumableSampler(train_ds, world.world_size, world.rank, t.seed)
        self.loader = data.train_loader(train_ds, self.sampler, t.batch_size, t.num_workers, cuda)
        self.val_loader = data.eval_loader(val_ds, 4 * t.batch_size, 0, cuda)
        steps = len(train_ds) // world.world_size // t.batch_size // t.grad_accum
        self.steps_per_epoch = min(steps, t.max_steps_per_epoch or steps)
        if self.steps_per_epoch == 0:
            raise InputError(f"{len(train_ds)} training rows do not fill one global batch of "
                             f"{self.global_batch}; lower train.batch_size or train.grad_accum")

    def _setup_model(self) -> None:
        t = self.t
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.model = build_model(self.folder, len(data.NUMERIC_NAMES), t.freeze_encoder,
                                 t.grad_checkpointing).to(self.device)
        if t.freeze_encoder:  # encode every product once; batches then carry product indices
            self.model.set_text_table(data.product_embeddings(
                self.layout.train, self.folder, self.tokens, self.model, self.device, self.main,
                self.barrier))
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.net, self.ddp = self.model, None
        if self.world.distributed:
            self.net = self.ddp = self._wrap_ddp(self.model)

    def _wrap_ddp(self, model: Forecaster) -> DDP:
        # Buffers (position ids, the text table) are constant: no syncing them every forward.
        ids = [self.device.index] if self.device.type == "cuda" else None
        if "forward_sync_buffers" in inspect.signature(DDP).parameters:
            return DDP(model, device_ids=ids, forward_sync_buffers=False)
        return DDP(model, device_ids=ids, broadcast_buffers=False)  # torch < 2.13

    def _setup_optimizer(self) -> None:
        t = self.t
        total_steps = t.epochs * self.steps_per_epoch
        warmup = min(t.warmup_steps, total_steps // 5)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, t.lr, t.encoder_lr,
                                                        t.weight_decay))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_cosine(warmup, total_steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    # ---- checkpoints ----------------------------------------------------------------------

    def load_checkpoint(self) -> None:
        """Continue from ``last.pt`` where there is one (mid-epoch included)."""
        if self.main:
            checkpoint.remove_stale_temporaries(self.layout.train)
        self.barrier()
        state = checkpoint.load(checkpoint.last_path(self.layout.train))
        if state is not None:
            self._update_recipe_state(state)

    def _update_recipe_state(self, state: dict[str, Any]) -> None:
        checkpoint.load_model_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best = state["global_step"], state["best"]
        saved_batch = state["sampler"]["global_batch"]
        if saved_batch != self.global_batch and self.main:
            log.warning("global batch changed from %d to %d since the checkpoint; the rest of "
                        "epoch %d is not the same sample order", saved_batch, self.global_batch,
                        self.epoch)
        if len(state["rng"]) == self.world.world_size:
            checkpoint.set_rng_state(state["rng"][self.world.rank])
        if self.step_in_epoch and state.get("log_interval"):
            # All-reduced at the next log line: rank 0 carries the sums of all ranks.
            self._resumed_interval = state["log_interval"] if self.main else [0.0, 0, 0, 0.0, 0.0]
        if self.main:
            log.info("resuming from %s at epoch %d, step %d of %d",
                     checkpoint.last_path(self.layout.train), self.epoch, self.step_in_epoch,
                     self.steps_per_epoch)

    def save_checkpoint(self) -> None:
        """``last.pt``: every rank calls this (the RNG states are gathered); rank 0 writes."""
        rng = dist.all_gather_object(self.world, checkpoint.rng_state())
        log_interval = dist.all_reduce_sum(self.world, self.interval.sums())
        log_interval.append(self.interval.seconds())
        if self.main:
            t, gb = self.t, self.global_batch
            checkpoint.save(checkpoint.last_path(self.layout.train), {
                "model": checkpoint.model_state(self.model, t.freeze_encoder),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch,
                "sampler": {"epoch": self.epoch, "seed": t.seed, "global_batch": gb,
                            "samples_seen": self.step_in_epoch * gb,
                            "world_size": self.world.world_size},
                "rng": rng, "log_interval": log_interval, "best": self.best,
                "norm": self.norm.to_dict(), "config": self.cfg.to_dict(),
            })
        self.barrier()

    def _save_best(self) -> None:
        """``best.pt``: the model and what prediction needs (rank 0)."""
        t = self.t
        checkpoint.save(checkpoint.best_path(self.layout.train), {
            "model": checkpoint.model_state(self.model, t.freeze_encoder),
            "model_dir": str(self.folder), "freeze_encoder": t.freeze_encoder,
            "max_length": t.max_length, "norm": self.norm.to_dict(), "epoch": self.epoch,
            "best": self.best, "config": self.cfg.to_dict(),
        })

    # ---- training -------------------------------------------------------------------------

    def train(self) -> StopReason:
        """Train to the last epoch, evaluating and checkpointing after each; or until a stop
        signal, after the step all ranks agreed on, with a checkpoint of that step."""
        if self.main:
            log.info("training %s parameters (%s in all) on %d rank(s), %s, global batch %d, "
                     "%d steps per epoch", f"{count_params(self.model, True):,}",
                     f"{count_params(self.model):,}", self.world.world_size, self.device,
                     self.global_batch, self.steps_per_epoch)
        while self.epoch < self.t.epochs:
            stop = self._train_epoch()
            if stop is not None:
                del self.loader  # end the loader's workers now, before Slurm signals them
                self.save_checkpoint()
                return stop
            self.evaluate()
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.save_checkpoint()
        return StopReason.DONE

    def _train_epoch(self) -> StopReason | None:
        """Optimizer steps from the current position to the end of the epoch; the reason to stop
        if a signal came (None when the epoch is done)."""
        t = self.t
        self.sampler.set_epoch(self.epoch, start=self.step_in_epoch * t.grad_accum * t.batch_size)
        self.net.train()
        batches = iter(self.loader)
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch,
                   desc=f"epoch {self.epoch}", disable=not self.main,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        resumed, self._resumed_interval = self._resumed_interval, None
        self.interval = Interval.resumed(resumed) if resumed else Interval()
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                self._train_step(batches)
                bar.update(1)
                if self.step_delay_s:
                    time.sleep(self.step_delay_s)  # a test hook (hpcpipe/runtime/faulthooks.py)
                if self.global_step % t.log_every == 0:
                    self._log_interval(bar)
                stop = dist.agreed_stop(self.world, self.signals)
                if stop is not None:
                    return stop
                if (self.global_step % t.checkpoint_every == 0
                        and self.step_in_epoch < self.steps_per_epoch):
                    self.save_checkpoint()
        finally:
            bar.close()
        return None

    def _train_step(self, batches: Iterator[data.Batch]) -> None:
        """One optimizer step over ``grad_accum`` micro-batches."""
        t, interval = self.t, self.interval
        for micro in range(t.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches).to(self.device)
            interval.data_wait += time.perf_counter() - t0
            with self._gradient_sync(micro == t.grad_accum - 1):
                with autocast(self.device, self.amp_dtype):
                    pred = self.net(*model_inputs(batch))
                loss = loss_fn(pred, batch["target"])
                self.scaler.scale(loss / t.grad_accum).backward()
            mask = batch.get("attention_mask")
            interval.add(loss, len(pred), int(mask.sum()) if mask is not None else 0)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trainable, t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1
        self.step_in_epoch += 1

    def _gradient_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP all-reduces gradients in every backward; accumulating, only the last needs it."""
        if self.ddp is None or last_micro_batch:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def _log_interval(self, bar: tqdm) -> None:
        """One ``train`` metrics record for the interval (all ranks' sums), then a new one."""
        loss_sum, samples, tokens, data_wait = dist.all_reduce_sum(self.world,
                                                                   self.interval.sums())
        elapsed = self.interval.seconds()
        self.samples_logged += samples
        self.seconds_logged += elapsed
        if self.main:
            cuda = self.device.type == "cuda"
            record = self.metrics.write(
                "train", epoch=self.epoch, global_step=self.global_step, loss=loss_sum / samples,
                lr=self.optimizer.param_groups[-1]["lr"], samples_per_s=samples / elapsed,
                tokens_per_s=tokens / elapsed if not self.t.freeze_encoder else None,
                gpu_mem_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else None,
                data_wait_frac=data_wait / self.world.world_size / elapsed)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        self.interval = Interval()

    # ---- evaluation and predictions -------------------------------------------------------

    def evaluate(self) -> None:
        """Validation SMAPE and MAE over every rank's share; ``best.pt`` when SMAPE improves."""
        row_ids, log_pred = predict.predict_log(self.model, self.val_loader, self.device,
                                                self.amp_dtype)
        counts, true = predict.to_counts(log_pred), self.rows.target[row_ids]
        abs_err, smape_sum, n = dist.all_reduce_sum(self.world, [
            float(np.abs(counts - true).sum()), float(predict.smape_terms(counts, true).sum()),
            float(len(true))])
        val_smape, val_mae = smape_sum / n, abs_err / n
        improvement = 100.0 * (self.baseline_smape - val_smape) / self.baseline_smape
        if self.main:
            self.metrics.write("eval", epoch=self.epoch, val_mae=val_mae, val_smape=val_smape,
                               **self.val_baselines, improvement_pct=improvement)
            log.info("epoch %d: val SMAPE %.4f (best baseline %.4f, %+.1f%%), val MAE %.3f",
                     self.epoch, val_smape, self.baseline_smape, improvement, val_mae)
        if val_smape < self.best["val_smape"]:
            self.best = {"val_smape": val_smape, "epoch": self.epoch, "val_mae": val_mae,
                         "improvement_pct": improvement}
            if self.main:
                self._save_best()

    def summarize(self) -> dict[str, Any] | None:
        """Rank 0 writes the best model's predictions and the summary record (returned; None
        on other ranks)."""
        if self.main:
            best_model, best_state = predict.load_best(self.layout.train, self.device)
            predict.predict_latest(self.layout, self.rows, best_model, best_state, self.device,
                                   self.t.precision)
            self.summary = self.metrics.write(
                "summary", best_epoch=self.best["epoch"], best_val_smape=self.best["val_smape"],
                best_baseline_smape=self.baseline_smape,
                improvement_pct=self.best.get("improvement_pct"),
                checkpoint=str(checkpoint.best_path(self.layout.train)),
                samples_per_s=(self.samples_logged / self.seconds_logged
                               if self.seconds_logged else None),
                predictions=str(self.layout.predictions), world_size=self.world.world_size,
                global_batch=self.global_batch)
        self.barrier()
        return self.summary

    def cleanup(self) -> None:
        """Leave the process group (safe after a setup that failed half-way)."""
        dist.teardown()
