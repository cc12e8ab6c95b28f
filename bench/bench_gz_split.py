"""One large .jsonl.gz on several Dask workers: read whole by one worker, or indexed with
rapidgzip and split into parts (what ingest does with GZ_SPLIT_WORKERS_PER_FILE workers per
file or more; here forced either way, on the cluster this script starts).

    python bench/bench_gz_split.py --reviews 2000000            # synthesize, then measure
    python bench/bench_gz_split.py --reviews-file R --metadata M

Both ways run the real ingest (``hpcpipe.steps.ingest.ingest``) on the same LocalCluster of
``--workers`` one-thread workers, in turned-round order for ``--repeat`` rounds; the split run's
time includes building the index. Prints each run's wall time, the best of each way and their
ratio (measured in the same run), and checks that the two outputs are equal (buckets, quarantine,
products, counts). The last line is the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import machine  # noqa: E402

import hpcpipe.steps.ingest as ingest_module  # noqa: E402
from hpcpipe.config import IngestConfig  # noqa: E402
from hpcpipe.steps.ingest.parts import GZ_SPLIT_WORKERS_PER_FILE  # noqa: E402
from hpcpipe.steps.synth import write_synthetic  # noqa: E402


def run_once(reviews: Path, metadata: Path, out: Path, client: Any, split: bool) -> float:
    """Ingest ``reviews`` into ``out``; the plan is told of enough workers to split the file
    (``split``) or of one (read whole), whatever the cluster has."""
    real = ingest_module.planned_parts

    def planned(work: Path, files: list[Path], n_workers: int, threads: int) -> Any:
        return real(work, files, GZ_SPLIT_WORKERS_PER_FILE * len(files) if split else 1,
                    threads)

    ingest_module.planned_parts = planned  # type: ignore[assignment]
    try:
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        ingest_module.ingest([reviews], metadata, out, IngestConfig(), client=client)
        return time.perf_counter() - start
    finally:
        ingest_module.planned_parts = real  # type: ignore[assignment]


def output(out: Path) -> tuple[Any, ...]:
    manifest = json.loads((out / "manifest.json").read_text())
    buckets = tuple(pq.read_table(p) for p in sorted(out.glob("reviews/*/*.parquet")))
    return (manifest["rows_in"], manifest["rows_out"], manifest["quarantined"],
            manifest["duplicates"], (out / "quarantine.jsonl").read_text(),
            pq.read_table(out / "products.parquet"), buckets)


def same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return (a[:5] == b[:5] and a[5].equals(b[5]) and len(a[6]) == len(b[6])
            and all(x.equals(y) for x, y in zip(a[6], b[6], strict=True)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reviews", type=int, default=2_000_000)
    ap.add_argument("--reviews-file", type=Path)
    ap.add_argument("--metadata", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    from distributed import Client, LocalCluster

    scratch = Path(tempfile.mkdtemp(prefix="bench-gz-split-"))
    try:
        if args.reviews_file:
            reviews, metadata = args.reviews_file, args.metadata
        else:
            made = write_synthetic(scratch / "raw", args.reviews, seed=0, sizes="realistic")
            reviews, metadata = Path(made["reviews_files"][0]), Path(made["metadata"])
        times: dict[str, list[float]] = {"whole": [], "split": []}
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            for r in range(args.repeat):
                order = ["whole", "split"] if r % 2 == 0 else ["split", "whole"]
                for way in order:
                    seconds = run_once(reviews, metadata, scratch / way, client, way == "split")
                    times[way].append(round(seconds, 2))
                    print(f"round {r + 1}: {way:5s} {seconds:6.1f} s", flush=True)
        equal = same(output(scratch / "whole"), output(scratch / "split"))
        best = {way: min(t) for way, t in times.items()}
        print(f"{reviews.name} ({reviews.stat().st_size / 1e6:.0f} MB), {args.workers} workers: "
              f"whole file {best['whole']:.1f} s, split {best['split']:.1f} s "
              f"({best['whole'] / best['split']:.2f}x); outputs equal: {equal}")
        print("machine:", machine())
        print(json.dumps({"file": str(reviews), "bytes": reviews.stat().st_size,
                          "workers": args.workers, "times": times, "best": best,
                          "speedup": round(best["whole"] / best["split"], 2),
                          "outputs_equal": equal}))
        return 0 if equal else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
