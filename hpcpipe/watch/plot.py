"""``hpcpipe summarize --plot``: loss, validation and throughput curves as one PNG."""

from __future__ import annotations

from pathlib import Path

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
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
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
    fig.suptitle(f"hpcpipe run {run.run_id}")
    fig.tight_layout()
    out = run.layout.root / "summary.png"
    with files.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out
