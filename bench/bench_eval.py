"""The train step's honest evaluation on the local default pipeline: model, baselines, floor.

    python bench/bench_eval.py                     # submit the local default run, then report
    python bench/bench_eval.py --run runs/<id>     # report on a finished run
    python bench/bench_eval.py --set train.seed=1  # extra settings for the submitted run

Runs ``hpcpipe submit --local --wait`` with the shipped local config (200k synthetic reviews)
in a scratch folder, then prints from the run's ``metrics.jsonl`` the validation table (every
forecast a whole count, on the same rows): the model at the epoch chosen on the inner weeks,
the naive baselines, LightGBM, the floor from the generator's expected counts, and the share of
the gap from rounded roll_mean_4 to the floor that the model closes; then the machine. The last
line is the same numbers as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hpcpipe.run.metrics import read_metrics


def submit(workdir: Path, settings: list[str]) -> Path:
    """Run the local default pipeline in ``workdir``; the run folder."""
    cmd = ["hpcpipe", "submit", "--local", "--wait", "--name", "bench-eval"]
    for s in settings:
        cmd += ["--set", s]
    subprocess.run(cmd, cwd=workdir, check=True)
    return max((workdir / "runs").iterdir(), key=lambda p: p.stat().st_mtime)


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, " \
        f"Python {platform.python_version()}, load average {load:.2f}"


def table(summary: dict[str, Any]) -> list[str]:
    rows = [("model", summary["model"])] + list(summary["baselines"].items())
    if summary.get("floor"):
        rows.append(("floor", summary["floor"]))
    out = [f"{'forecast':22s} {'SMAPE':>7s} {'y=0':>7s} {'y>0':>7s} {'MAE':>7s} "
           f"{'MAElog':>7s} {'RMSElog':>7s}"]
    for name, s in rows:
        out.append(f"{name:22s} {s['smape']:7.4f} {s['smape_zero']:7.4f} "
                   f"{s['smape_nonzero']:7.4f} {s['mae']:7.3f} {s['mae_log1p']:7.4f} "
                   f"{s['rmse_log1p']:7.4f}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="a finished run folder (default: submit one)")
    ap.add_argument("--workdir", type=Path, help="where to submit (default: a temporary one)")
    ap.add_argument("--set", action="append", default=[], dest="settings")
    args = ap.parse_args()
    seconds = None
    if args.run is None:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-eval-"))
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        args.run = submit(workdir, args.settings)
        seconds = time.perf_counter() - start
    records = read_metrics(args.run / "metrics.jsonl")
    summaries = [r for r in records if r.get("step") == "train" and r.get("kind") == "summary"
                 and isinstance(r.get("baselines"), dict)]
    if not summaries:
        print(f"{args.run}: no train summary with the evaluation table", file=sys.stderr)
        return 1
    s = summaries[-1]
    print(f"run {args.run}" + (f" ({seconds:.0f} s end to end)" if seconds else ""))
    print(f"best epoch {s['best_epoch']} (chosen on {s['inner_weeks']} inner weeks from "
          f"{s['inner_start']}); {s['model']['rows']} validation rows, "
          f"{100 * s['model']['zero_share']:.1f}% with target 0; every forecast a whole count")
    print("\n".join(table(s)))
    gap = s.get("gap_closed_pct")
    print(f"strongest naive baseline {s['strongest_baseline']}: model "
          f"{s['improvement_pct']:+.1f}%; strongest of all {s['strongest_any']}: model "
          f"{s['improvement_vs_any_pct']:+.1f}%; gap from rounded roll_mean_4 to the floor "
          f"closed: {'-' if gap is None else f'{gap:.1f}%'}")
    versus = (s.get("versus_baselines") or {}).get(s["strongest_any"])
    if versus:
        print(f"model minus {s['strongest_any']}: SMAPE {versus['diff']:+.4f}, "
              f"{100 * versus['level']:.0f}% paired bootstrap interval [{versus['low']:+.4f}, "
              f"{versus['high']:+.4f}] ({versus['resamples']} resamples of the rows)")
    for note in s.get("eval_notes") or []:
        print("note:", note)
    print(f"seconds: {s.get('eval_seconds')}")
    print("machine:", machine())
    print(json.dumps({k: s.get(k) for k in ("best_epoch", "best_val_smape", "model", "baselines",
                                            "floor", "gap_closed_pct", "versus_baselines",
                                            "eval_notes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
