"""What ``ingest.keep_text`` costs: the ingest step alone, default against keep_text, one machine.

    python bench/bench_keep_text.py [--reviews 31800000] [--data-dir bench/data] [--repeat 2]

Runs ``python -m hpcpipe.jobs.ingest`` (the real entry point, its own Dask cluster sized from the
machine) on the realistic files that ``bench_end_to_end.py`` made (``<data-dir>/e2e-<N>/raw``;
run that first), once with the default (only the text's length is kept) and once with
``ingest.keep_text: true`` (title and text spilled lz4 and written to the buckets), alternated
default, keep, keep, default, ... so that a machine that drifts favours neither. Each run's wall
time, the peak memory of its process tree (sampled every 0.25 s) and the bytes of the buckets it
wrote are kept in ``<data-dir>/e2e-<N>/keep_text.json``; the ratios use the means.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_features  # noqa: E402
from bench_end_to_end import new_run  # noqa: E402

MODES = ("default", "keep_text")


def phase_ingest(a: argparse.Namespace) -> dict[str, Any]:
    """One ingest run through its job entry point on a fresh run folder."""
    layout = new_run(Path(a.raw), Path(a.run), keep_text=a.phase == "keep_text")
    subprocess.run([sys.executable, "-m", "hpcpipe.jobs.ingest", "--run-dir", str(layout.root)],
                   check=True)
    manifest = json.loads((layout.ingest / "manifest.json").read_text())
    return {"rows_out": manifest["rows_out"],
            "bucket_bytes": sum(f.stat().st_size
                                for f in (layout.ingest / "reviews").rglob("*.parquet"))}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reviews", type=int, default=31_800_000)
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--repeat", type=int, default=2, help="runs of each mode")
    p.add_argument("--phase", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--raw", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        Path(a.result).write_text(json.dumps(phase_ingest(a)))
        return

    base = (a.data_dir / f"e2e-{a.reviews}").resolve()
    raw, logs, run = base / "raw", base / "logs", base / "run-keep-text"
    if not (raw / "meta.jsonl.gz").is_file():
        raise SystemExit(f"{raw} has no realistic data: run "
                         f"`python bench/bench_end_to_end.py --reviews {a.reviews}` first")
    logs.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    try:
        for r in range(a.repeat):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                result = bench_features.run_phase(
                    mode, ["--raw", str(raw), "--run", str(run)], logs / f"{mode}-{r}.log",
                    script=__file__, every=0.25)
                runs[mode].append({**result, "round": r})
                print(f"{mode:<10} {result['wall_s']:>8.1f} s "
                      f"{result['peak_tree_rss_bytes'] / 1e9:>6.2f} GB peak "
                      f"{result['result']['bucket_bytes'] / 1e9:>6.2f} GB of buckets", flush=True)
    finally:
        shutil.rmtree(run, ignore_errors=True)
    wall = {m: _mean([r["wall_s"] for r in runs[m]]) for m in MODES}
    peak = {m: max(r["peak_tree_rss_bytes"] for r in runs[m]) for m in MODES}
    report = {"reviews": a.reviews, "runs": runs,
              "keep_text_over_default": {"wall": round(wall["keep_text"] / wall["default"], 2),
                                         "peak_rss": round(peak["keep_text"] / peak["default"],
                                                           2)}}
    (base / "keep_text.json").write_text(json.dumps(report, indent=2))
    print("keep_text / default (mean wall, largest peak):", report["keep_text_over_default"])


if __name__ == "__main__":
    main()
