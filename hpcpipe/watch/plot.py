"""``hpcpipe summarize --plot``: loss, validation and throughput curves, and the train job's GPU
use (utilisation and memory per GPU from its NVML samples, the loader's data wait), with the
requeued starts marked, as one PNG."""

from __future__ import annotations

from pathlib import Path

from hpcpipe.run import gpu_samples
from hpcpipe.run.folder import Run
from hpcpipe.run.metrics import read_metrics


def write_plot(run: Run) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpcpipe import files

    metrics = read_metrics(run.layout.metrics)
    train = [m for m in metrics if m.get("step") == "train" and m.get("kind") == "train"]
    evals = [m for m in metrics if m.get("step") == "train" and m.get("kind") == "eval"]
    fig, grid = plt.subplots(2, 3, figsize=(15, 8))
    axes = list(grid[0]) + list(grid[1])
    ax = axes[0]
    if train:
        ax.plot([m["global_step"] if "global_step" in m else i for i, m in enumerate(train)],
                [m["loss"] for m in train], label="train loss")
    ax.set_title("training loss")
    ax.set_xlabel("optimizer step")
    ax.legend() if train else ax.text(0.5, 0.5, "no training metrics", ha="center")
    ax = axes[1]
    if evals:
        ep = [m["epoch"] for m in evals]
        ax.plot(ep, [m["val_smape"] for m in evals], "o-", label="model")
        ax.plot(ep, [m["baseline_same_smape"] for m in evals], "--", label="same as this week")
        ax.plot(ep, [m["baseline_roll4_smape"] for m in evals], ":", label="roll_mean_4")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no validation yet", ha="center")
    ax.set_title("validation SMAPE")
    ax.set_xlabel("epoch")
    ax = axes[2]
    if train:
        t0 = train[0]["time"]
        ax.plot([m["time"] - t0 for m in train], [m.get("samples_per_s", 0) for m in train])
    ax.set_title("training throughput (samples/s)")
    ax.set_xlabel("seconds")
    _gpu_panels(axes[3:], gpu_samples.read_samples(run.layout.train), train)
    fig.suptitle(f"hpcpipe run {run.run_id}")
    fig.tight_layout()
    out = run.layout.root / "summary.png"
    with files.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out


def _gpu_panels(axes: list, records: list[dict], train: list[dict]) -> None:
    """Utilisation and memory per GPU over time, and the data-wait fraction; a dotted line where
    a requeued start of the job began."""
    util, mem, wait = axes
    t0 = min([r["time"] for r in records[:1]] + [m["time"] for m in train[:1]], default=0.0)
    for label, times, pct, gib in gpu_samples.iter_gpu_series(records):
        util.plot([t - t0 for t in times], pct, label=label)
        mem.plot([t - t0 for t in times], gib, label=label)
    if train and any(isinstance(m.get("data_wait_frac"), (int, float)) for m in train):
        wait.plot([m["time"] - t0 for m in train],
                  [100 * (m.get("data_wait_frac") or 0.0) for m in train])
    else:
        wait.text(0.5, 0.5, "no data-wait figures", ha="center")
    for ax, title in ((util, "GPU utilisation (%, NVML)"), (mem, "GPU memory in use (GiB, NVML)"),
                      (wait, "time waiting for data (%)")):
        for t in gpu_samples.restart_times(records):
            ax.axvline(t - t0, color="grey", linestyle=":", label=None)
        ax.set_title(title)
        ax.set_xlabel("seconds")
    if records:
        util.legend(fontsize="small")
    else:
        for ax in (util, mem):
            ax.text(0.5, 0.5, "no GPU samples", ha="center")
