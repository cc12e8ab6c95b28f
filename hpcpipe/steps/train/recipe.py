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

A loss, gradient norm or validation score that is not a finite number is a failure, never a
score: every rank raises :class:`~hpcpipe.steps.train.stop.DivergedError` after the same step,
saying where and what to try, and no checkpoint of diverged weights is written. A checkpoint
computed from other feature data or settings is not continued
(:class:`~hpcpipe.steps.train.stop.CheckpointMismatchError`).
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
from hpcpipe.steps.train import checkpoint, data, dist, evaluate, gpu_sampler, loaders, predict
from hpcpipe.steps.train.model import (
    Forecaster,
    autocast,
    autocast_dtype,
    build_model,
    count_nll,
    count_params,
    encoder_fingerprint,
    model_dir,
    model_inputs,
    param_groups,
    precision_name,
)
from hpcpipe.steps.train.shared import shared
from hpcpipe.steps.train.stop import (
    CheckpointMismatchError,
    DivergedError,
    StopReason,
    StopSignals,
)

log = logging.getLogger(__name__)

#: Optimizer steps between the ranks' checks for a stop signal or divergence (also checked at
#: every log line, checkpoint and epoch end). Each check is a collective and reads the device's
#: divergence flags, so it waits for the GPU: every step, it would keep the host in the loop.
STOP_CHECK_EVERY = 8


def warmup_cosine(warmup: int, total: int, floor: float = 0.05) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether torch has a fused AdamW for ``device`` (CUDA; CPU since torch 2.4)."""
    probe = torch.zeros(1, device=device, requires_grad=True)
    try:
        torch.optim.AdamW([probe], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The counts' negative log-likelihood under the model's negative binomial: the model
    learns the distribution, from which the forecast is the SMAPE-optimal whole count."""
    return count_nll(pred, target)


@dataclass
class Interval:
    """Sums over the metrics log interval in progress, on this rank.

    One all-reduce at the log line turns them into the job's numbers. A mid-epoch checkpoint
    stores the job's sums and the seconds so far (``log_interval``), so the first line logged
    after a resume averages the whole interval, not just the part after the restart.
    """

    # The loss and token sums stay on the device (tensors) until the log line reads them: reading
    # them every micro-step would make the host wait for the GPU each time.
    loss_sum: float | torch.Tensor = 0.0  # per-sample loss, summed
    samples: int = 0
    tokens: int | torch.Tensor = 0
    data_wait: float = 0.0  # seconds spent waiting for the loader
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def resumed(cls, saved: list[float]) -> Interval:
        """The interval a checkpoint's ``log_interval`` was saved in, continued from now."""
        loss_sum, samples, tokens, data_wait, seconds = saved
        return cls(loss_sum, int(samples), int(tokens), data_wait, time.perf_counter() - seconds)

    def add(self, loss: torch.Tensor, samples: int, tokens: int | torch.Tensor) -> None:
        """Add a micro-batch's mean loss (a tensor, not read here) over ``samples`` rows."""
        self.loss_sum = self.loss_sum + loss.detach().float() * samples
        self.samples += samples
        self.tokens = self.tokens + tokens

    def sums(self) -> list[float]:
        """The sums as numbers (this reads the device: call it at a log line or checkpoint)."""
        return [float(self.loss_sum), self.samples, float(self.tokens), self.data_wait]

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
    table: dict[str, Any]  # baselines and floor on the validation rows (rank 0; {} elsewhere)
    sampler: data.ResumableSampler
    loader: DataLoader
    val_loader: DataLoader
    inner_loader: DataLoader
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
        # The epoch is chosen on the inner weeks (held out of the training weeks), never on the
        # validation weeks it is reported on.
        self.best: dict[str, Any] = {"inner_smape": math.inf, "epoch": None}
        self.interval = Interval()
        self._resumed_interval: list[float] | None = None  # for the first epoch after a resume
        # Throughput over the logged intervals of this start, for the summary.
        self.samples_logged, self.seconds_logged = 0.0, 0.0
        self.step_delay_s = faulthooks.delay_s(faulthooks.STEP_DELAY_ENV)
        self.summary: dict[str, Any] | None = None
        self.batches: Iterator[data.Batch] = iter(())
        self.gpu_sampler: gpu_sampler.Sampler | None = None

    @property
    def main(self) -> bool:
        return self.world.is_main

    def barrier(self) -> None:
        dist.barrier(self.world)

    # ---- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        self._setup_distributed()
        self._start_gpu_sampler()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()

    def _setup_distributed(self) -> None:
        t = self.t
        self.layout.train.mkdir(parents=True, exist_ok=True)  # the rendezvous file's folder
        self.world = dist.setup(self.job, self.layout.train)
        self.device = self.world.device
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.amp_dtype = autocast_dtype(self.device, t.precision)
        if self.main:
            where = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                     else "CPU")
            log.info("train.precision %s: training in %s on %s", t.precision,
                     precision_name(self.amp_dtype), where)
        self.global_batch = t.batch_size * self.world.world_size * t.grad_accum

    def _start_gpu_sampler(self) -> None:
        """One sampler of GPU use per node (local rank 0), where the job trains on GPUs."""
        if self.device.type == "cuda" and self.world.local_rank == 0:
            self.gpu_sampler = gpu_sampler.start(self.layout.train, self.job.restart_count,
                                                 self.job.node_gpus)

    def _setup_data(self) -> None:
        t, world = self.t, self.world
        if t.num_workers:
            loaders.worker_context()  # first: its helpers must start shielded from stop signals
        self.rows = rows = data.load_rows(self.layout)
        self.features_fingerprint = data.rows_fingerprint(rows)
        self.split = split = data.split_by_time(rows, t.val_weeks, t.train_weeks)
        self.norm = data.Normalizer.fit(rows.numeric[split.train])
        if self.main:
            write_json(self.layout.train / "norm.json", {**self.norm.to_dict(), **split.describe()})
            log.info("%d feature rows of %d products: %s", len(rows), len(rows.products),
                     split.describe())
        self.folder = model_dir(t.model)
        self.tokens = data.token_cache(self.layout.train, self.folder, rows, t.max_length,
                                       self.main, self.barrier)
        self.table = {}
        if self.main:  # LightGBM takes seconds on the local sample: once, on rank 0
            self.table = evaluate.baseline_table(
                rows, split, self.layout.raw, synthetic=not self.cfg.data.reviews, seed=t.seed,
                threads=max(1, torch.get_num_threads()))

        numeric, product = self.norm.transform(rows.numeric), rows.product
        # A frozen encoder's output is looked up per product on the device: no tokens in batches.
        batch_tokens = None if t.freeze_encoder else self.tokens
        history = data.History.from_rows(rows)
        if t.num_workers:  # the three datasets' workers then map one copy of the tables
            numeric, product = shared(numeric), shared(product)
            history.share_memory()
        train_ds = data.ForecastDataset(split.fit, numeric, rows.target, product,
                                        batch_tokens, history=history)
        val_ds, inner_ds = (data.ForecastDataset(index[world.rank::world.world_size], numeric,
                                                 rows.target, product, batch_tokens,
                                                 with_rows=True, history=history)
                            for index in (split.val, split.inner))
        cuda = self.device.type == "cuda"
        self.sampler = data.ResumableSampler(train_ds, world.world_size, world.rank, t.seed)
        self.loader = loaders.train_loader(train_ds, self.sampler, t.batch_size, t.num_workers,
                                          cuda)
        # Evaluation reads as many rows as an epoch's share of training: workers for it too.
        self.val_loader = loaders.eval_loader(val_ds, 4 * t.batch_size, t.num_workers, cuda)
        self.inner_loader = loaders.eval_loader(inner_ds, 4 * t.batch_size, t.num_workers, cuda)
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
        if t.compile:
            # Compiled around DDP, whose graph breaks at the gradient buckets let the all-reduce
            # overlap the backward. Evaluation and checkpoints use the plain model.
            self.net = torch.compile(self.net)  # type: ignore[assignment]

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
        groups = param_groups(self.model, t.lr, t.encoder_lr, t.weight_decay)
        # Fused AdamW (one kernel for all parameters) takes the loss scaler's found-inf flag on
        # the device: the step is skipped there, with no read of the flag by the host.
        self.optimizer = torch.optim.AdamW(groups, fused=fused_adamw_supported(self.device))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_cosine(warmup, total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self._scaler_saved: dict[str, Any] = {}  # a checkpoint's loss scale, kept when not used
        # Divergence, noted on the device and read at the stop checks: the global step of the
        # first non-finite value (-1: none), what it was (0: the loss, 1: the gradient norm) and
        # the value itself.
        self._bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._bad_what = torch.zeros((), dtype=torch.int64, device=self.device)
        self._bad_value = torch.zeros((), dtype=torch.float32, device=self.device)

    # ---- checkpoints ----------------------------------------------------------------------

    def load_checkpoint(self) -> None:
        """Continue from ``last.pt`` where there is one (mid-epoch included)."""
        if self.main:
            checkpoint.remove_stale_temporaries(self.layout.train)
        self.barrier()
        state = checkpoint.load(checkpoint.last_path(self.layout.train))
        if state is not None:
            self._check_computed_from(state.get("computed_from"))
            self._update_recipe_state(state)

    def _update_recipe_state(self, state: dict[str, Any]) -> None:
        checkpoint.load_model_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._scaler_saved = checkpoint.restore_scaler(self.scaler, state.get("scaler") or {})
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best = state["global_step"], state["best"]
        if len(state["rng"]) == self.world.world_size:
            checkpoint.set_rng_state(state["rng"][self.world.rank])
        if self.step_in_epoch and state.get("log_interval"):
            # All-reduced at the next log line: rank 0 carries the sums of all ranks.
            self._resumed_interval = state["log_interval"] if self.main else [0.0, 0, 0, 0.0, 0.0]
        if self.main:
            log.info("resuming from %s at epoch %d, step %d of %d",
                     checkpoint.last_path(self.layout.train), self.epoch, self.step_in_epoch,
                     self.steps_per_epoch)

    def computed_from(self) -> dict[str, Any]:
        """What the training state is computed from: the feature data (a hash of the rows as
        read) and every setting that shapes the result. Settings that do not (time limit,
        memory, workers, logging, checkpoint interval, how the global batch is split over GPUs
        and accumulation, the precision: ``auto`` is bf16 on one GPU and fp16 on another, and a
        requeued job may land on either) are left out, so a requeue or ``rerun --set
        train.time=...`` continues."""
        t = self.t
        return {"features": self.features_fingerprint, "train": {
            "model": encoder_fingerprint(self.folder), "freeze_encoder": t.freeze_encoder,
            "max_length": t.max_length, "global_batch": self.global_batch, "epochs": t.epochs,
            "max_steps_per_epoch": t.max_steps_per_epoch, "lr": t.lr, "encoder_lr": t.encoder_lr,
            "weight_decay": t.weight_decay, "warmup_steps": t.warmup_steps,
            "grad_clip": t.grad_clip, "val_weeks": t.val_weeks,
            "train_weeks": t.train_weeks, "inner_weeks": self.split.inner_weeks,
            "seed": t.seed}}

    def _check_computed_from(self, saved: dict[str, Any] | None) -> None:
        """Refuse to continue a checkpoint of other data or settings, saying what changed."""
        now = self.computed_from()
        if saved == now:
            return
        where = checkpoint.last_path(self.layout.train)
        if saved is None:
            changes = ["it does not record what it was computed from"]
        else:
            changes = []
            if saved.get("features") != now["features"]:
                changes.append("the feature data changed (features or ingest were recomputed "
                               "from other input)")
            old = saved.get("train", {})
            for key, value in now["train"].items():
                if old.get(key) != value:
                    name = "the model folder's weights" if key == "model" else \
                        "the global batch (batch_size x gpus x grad_accum)" \
                        if key == "global_batch" else f"train.{key}"
                    changes.append(f"{name} {old.get(key)} -> {value}")
        raise CheckpointMismatchError(
            f"{where} was computed from other data or settings than this run now has: "
            f"{'; '.join(changes)}. Continuing from it would mix the two, so training does not "
            "start. To train from scratch with the new data and settings: `hpcpipe rerun train "
            "--fresh` (the old checkpoints are moved aside, not deleted); to continue the old "
            "training, set the settings back.")

    def _check_finite_weights(self, what: str) -> None:
        """Never write diverged weights: a checkpoint of NaN weights would resume to NaN and a
        best.pt of them would forecast NaN."""
        bad = [name for name, p in self.model.named_parameters()
               if p.requires_grad and not bool(torch.isfinite(p).all())]
        if bad:
            raise DivergedError(
                f"training diverged: {len(bad)} weight tensors (e.g. {bad[0]}) hold numbers that "
                f"are not finite at epoch {self.epoch} step {self.step_in_epoch}; {what} is not "
                f"written. {self._advice()}")

    def _advice(self) -> str:
        t = self.t
        lrs = f"train.lr (now {t.lr})" + ("" if t.freeze_encoder else
                                          f" and train.encoder_lr (now {t.encoder_lr})")
        return (f"Try a lower {lrs}, train.precision=fp32 (now {t.precision}) or a smaller "
                f"train.grad_clip (now {t.grad_clip}), and train from scratch: "
                "`hpcpipe rerun train --fresh --set train.lr=<lower>`.")

    def save_checkpoint(self) -> None:
        """``last.pt``: every rank calls this (the RNG states are gathered); rank 0 writes."""
        self._check_finite_weights("the checkpoint")
        rng = dist.all_gather_object(self.world, checkpoint.rng_state())
        log_interval = dist.all_reduce_sum(self.world, self.interval.sums())
        log_interval.append(self.interval.seconds())
        if self.main:
            t, gb = self.t, self.global_batch
            checkpoint.save(checkpoint.last_path(self.layout.train), {
                "model": checkpoint.model_state(self.model, t.freeze_encoder),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": checkpoint.scaler_state(self.scaler, self._scaler_saved),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch,
                "sampler": {"epoch": self.epoch, "seed": t.seed, "global_batch": gb,
                            "samples_seen": self.step_in_epoch * gb,
                            "world_size": self.world.world_size},
                "rng": rng, "log_interval": log_interval, "best": self.best,
                "norm": self.norm.to_dict(), "config": self.cfg.to_dict(),
                "computed_from": self.computed_from(),
            })
        self.barrier()

    def _save_best(self) -> None:
        """``best.pt``: the model and what prediction needs (rank 0)."""
        t = self.t
        self._check_finite_weights("best.pt")
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
                self._end_loader()  # end the loader's workers now, before Slurm kills them
                self.save_checkpoint()
                return stop
            self.evaluate()
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.save_checkpoint()
        return StopReason.DONE

    def _stopping(self) -> bool:
        return self.signals.term or self.signals.usr2

    def _train_epoch(self) -> StopReason | None:
        """Optimizer steps from the current position to the end of the epoch; the reason to stop
        if a signal came (None when the epoch is done)."""
        t = self.t
        self.sampler.set_epoch(self.epoch, start=self.step_in_epoch * t.grad_accum * t.batch_size)
        self.net.train()
        self.batches = iter(self.loader)
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch,
                   desc=f"epoch {self.epoch}", disable=not self.main,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        resumed, self._resumed_interval = self._resumed_interval, None
        self.interval = Interval.resumed(resumed) if resumed else Interval()
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                self._train_step()
                bar.update(1)
                if self.step_delay_s:
                    time.sleep(self.step_delay_s)  # a test hook (hpcpipe/faulthooks.py)
                log_now = self.global_step % t.log_every == 0
                save_now = (self.global_step % t.checkpoint_every == 0
                            and self.step_in_epoch < self.steps_per_epoch)
                if not (log_now or save_now or self.step_in_epoch == self.steps_per_epoch
                        or self.global_step % STOP_CHECK_EVERY == 0):
                    continue  # the host queues the next step while the device works
                stop, diverged = dist.agreed_stop(self.world, self.signals,
                                                  bool(self._bad_step >= 0))
                if diverged:
                    raise DivergedError(self._divergence_message())
                if log_now:
                    self._log_interval(bar)
                if stop is not None:
                    return stop
                if save_now:
                    self.save_checkpoint()
        finally:
            bar.close()
        return None

    def _train_step(self) -> None:
        """One optimizer step over ``grad_accum`` micro-batches, queued without waiting for the
        device: nothing here reads a tensor's value.

        A loss that is not finite is noted on the device (the ranks agree on it at the next stop
        check); so are gradients that are not finite, and then the optimizer skips the step
        (fused AdamW's found-inf flag), so the weights stay finite until the check. (With fp16's
        GradScaler, non-finite gradients are its normal signal to skip the step and lower the
        scale: only the loss is checked then.)
        """
        t, interval = self.t, self.interval
        for micro in range(t.grad_accum):
            t0 = time.perf_counter()
            batch = self._next_batch(micro).to(self.device)
            interval.data_wait += time.perf_counter() - t0
            with self._gradient_sync(micro == t.grad_accum - 1):
                with autocast(self.device, self.amp_dtype):
                    pred = self.net(*model_inputs(batch))
                loss = loss_fn(pred, batch["target"])
                self.scaler.scale(loss / t.grad_accum).backward()
            self._note_nonfinite(loss.detach(), 0)
            mask = batch.get("attention_mask")
            interval.add(loss, batch["target"].shape[0], mask.sum() if mask is not None else 0)
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, t.grad_clip)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips the step itself on non-finite gradients
        else:
            self._note_nonfinite(norm, 1)
            self._step_unless_nonfinite(norm)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1
        self.step_in_epoch += 1

    def _note_nonfinite(self, value: torch.Tensor, what: int) -> None:
        """Remember the first non-finite ``value`` of this start, on the device."""
        first = ~torch.isfinite(value) & (self._bad_step < 0)
        self._bad_step = torch.where(first, self.global_step + 1, self._bad_step)
        self._bad_what = torch.where(first, what, self._bad_what)
        self._bad_value = torch.where(first, value.float(), self._bad_value)

    def _step_unless_nonfinite(self, norm: torch.Tensor) -> None:
        """The optimizer step, skipped on the device where the gradient norm is not finite."""
        if not getattr(self.optimizer, "defaults", {}).get("fused"):
            if torch.isfinite(norm):  # reads the device: only without fused AdamW
                self.optimizer.step()
            return
        opt: Any = self.optimizer
        opt.grad_scale, opt.found_inf = None, (~torch.isfinite(norm)).float()
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf

    def _next_batch(self, micro: int) -> data.Batch:
        """The next micro-batch. A loader worker that died after a stop signal (the workers
        block and ignore the stop signals, but Slurm may kill one all the same) does not end the
        rank: the rest of the step reads the same samples without workers, and the loop stops
        after it with a checkpoint."""
        try:
            return next(self.batches)
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            deadline = time.monotonic() + 2.0  # the rank's own signal may be a moment behind
            while not self._stopping() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self._stopping():
                raise
            t = self.t
            log.warning("a data loader worker ended after the stop signal (%s); this rank "
                        "reads the rest of the step without workers", exc)
            position = (self.step_in_epoch * t.grad_accum + micro) * t.batch_size
            self.sampler.set_epoch(self.epoch, start=position)
            dataset = self.loader.dataset
            assert isinstance(dataset, data.ForecastDataset)
            self.batches = iter(loaders.train_loader(dataset, self.sampler, t.batch_size, 0,
                                                  self.device.type == "cuda"))
            return next(self.batches)

    def _divergence_message(self) -> str:
        bad_step, what_code, value = (self._bad_step.item(), self._bad_what.item(),
                                      self._bad_value.item())
        if bad_step < 0:
            what = "another rank saw a loss or gradient norm that is not finite"
            bad_step = self.global_step
        else:
            name = "the loss" if what_code == 0 else "the gradient norm"
            what = f"{name} is {value}" + (f" on rank {self.world.rank}"
                                           if self.world.distributed else "")
        step = self.step_in_epoch - (self.global_step - int(bad_step))
        where = f"at epoch {self.epoch} step {step} (global step {int(bad_step)})"
        return (f"training diverged: {what} {where}; nothing of this step is saved (last.pt "
                f"holds an earlier step, best.pt the best finite model). {self._advice()}")

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
        """Score the epoch on the inner weeks (which choose ``best.pt``) and on the validation
        weeks (reported only), over every rank's share, in whole counts."""
        val = self._score(self.val_loader, "validation")
        inner = self._score(self.inner_loader, "inner-week (held out of training)")
        if self.main:
            record = self._eval_record(inner, val)
            self.metrics.write("eval", **record)
            log.info("epoch %d: inner SMAPE %.4f (chooses the epoch); val SMAPE %.4f (strongest "
                     "naive baseline %s %.4f, %+.1f%%), val MAE %.3f", self.epoch,
                     inner["smape"], val["smape"], record["strongest_baseline"],
                     record["strongest_baseline_smape"], record["improvement_pct"],
                     val["mae"])
        if inner["smape"] < self.best.get("inner_smape", math.inf):
            self.best = {"inner_smape": inner["smape"], "epoch": self.epoch,
                         "val_smape": val["smape"], "val": val}
            if self.main:
                self._save_best()

    def _score(self, loader: DataLoader, what: str) -> dict[str, float]:
        """:func:`evaluate.scores` of the model's whole-count forecasts of ``loader``'s rows
        (all ranks' shares: one all-reduce); a forecast that is not finite is divergence."""
        row_ids, log_pred = predict.predict_log(self.model, loader, self.device, self.amp_dtype)
        sums = dist.all_reduce_sum(self.world, [
            *evaluate.score_sums(predict.to_counts(log_pred), self.rows.target[row_ids]),
            float((~np.isfinite(log_pred).all(axis=-1)).sum())])
        bad, got = sums[-1], evaluate.scores_from_sums(sums[:-1])
        if bad or not (math.isfinite(got["smape"]) and math.isfinite(got["mae"])):
            # On every rank (the sums are the job's): no score, no eval record, no best.pt.
            raise DivergedError(
                f"training diverged: {what} forecasts are not finite at epoch {self.epoch} "
                f"({int(bad)} of {got['rows']} are NaN or infinite; SMAPE {got['smape']}, MAE "
                f"{got['mae']}): the model's weights give no usable forecast. {self._advice()}")
        return got

    def _eval_record(self, inner: dict[str, float], val: dict[str, float]) -> dict[str, Any]:
        """The epoch's ``eval`` metrics: inner and validation scores, and the naive baselines
        (whole counts) with the margin over the strongest."""
        base = self.table["baselines"]
        name, smape = evaluate.strongest(base, evaluate.NAIVE)
        return {
            "epoch": self.epoch, "inner_smape": inner["smape"], "inner_rows": inner["rows"],
            "val_smape": val["smape"], "val_mae": val["mae"],
            "val_smape_zero": val["smape_zero"], "val_smape_nonzero": val["smape_nonzero"],
            "val_mae_log1p": val["mae_log1p"], "val_rmse_log1p": val["rmse_log1p"],
            "baseline_same_smape": base["same_week"]["smape"],
            "baseline_same_mae": base["same_week"]["mae"],
            "baseline_roll4_smape": base["roll_mean_4"]["smape"],
            "baseline_roll4_mae": base["roll_mean_4"]["mae"],
            "baselines_whole_counts": True, "strongest_baseline": name,
            "strongest_baseline_smape": smape,
            "improvement_pct": evaluate.improvement_pct(val["smape"], smape),
        }

    def summarize(self) -> dict[str, Any] | None:
        """Rank 0 writes the best model's predictions and the summary record (returned; None
        on other ranks): the best epoch (chosen on the inner weeks), its validation scores next
        to every baseline's and the floor's, and the margins."""
        if self.main:
            best_model, best_state = predict.load_best(self.layout.train, self.device)
            predict.predict_latest(self.layout, self.rows, best_model, best_state, self.device,
                                   self.t.precision)
            table, val = self.table, self.best["val"]
            naive, naive_smape = evaluate.strongest(table["baselines"], evaluate.NAIVE)
            every, every_smape = evaluate.strongest(table["baselines"])
            _, counts = predict.forecast_counts(self.layout, self.rows, best_model, best_state,
                                                self.device, self.t.precision, self.split.val)
            true = self.rows.target[self.split.val]
            versus = evaluate.versus_baselines(counts, table, true, seed=self.t.seed)
            self.summary = self.metrics.write(
                "summary", best_epoch=self.best["epoch"], epoch_chosen_on="inner weeks",
                inner_weeks=self.split.inner_weeks, inner_start=str(self.split.inner_start),
                best_inner_smape=self.best["inner_smape"], best_val_smape=val["smape"],
                best_baseline_smape=naive_smape, strongest_baseline=naive,
                improvement_pct=evaluate.improvement_pct(val["smape"], naive_smape),
                strongest_any=every, strongest_any_smape=every_smape,
                improvement_vs_any_pct=evaluate.improvement_pct(val["smape"], every_smape),
                model=val, baselines=table["baselines"], floor=table["floor"],
                gap_closed_pct=evaluate.gap_closed_pct(val["smape"], table),
                gap_closed_interval=evaluate.gap_closed_interval(counts, table, true,
                                                                 seed=self.t.seed),
                versus_baselines=versus,
                eval_notes=table["notes"], eval_seconds=table["seconds"],
                checkpoint=str(checkpoint.best_path(self.layout.train)),
                samples_per_s=(self.samples_logged / self.seconds_logged
                               if self.seconds_logged else None),
                predictions=str(self.layout.predictions), world_size=self.world.world_size,
                global_batch=self.global_batch)
        self.barrier()
        return self.summary

    def _end_loader(self) -> None:
        """End the training loader's workers through the loader's own shutdown (a sentinel they
        obey). They ignore SIGTERM, so multiprocessing's terminate-and-join at interpreter exit
        would wait for them forever: they must be gone before the process ends."""
        self.batches = iter(())
        self.__dict__.pop("loader", None)

    def cleanup(self) -> None:
        """End the loader's workers and leave the process group (safe after a setup that
        failed half-way)."""
        self._end_loader()
        gpu_sampler.stop(self.gpu_sampler)
        self.gpu_sampler = None
        dist.teardown()
