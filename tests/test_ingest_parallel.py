"""Ingest on Dask: parts of files in parallel, exact whatever the parallelism, resumable.

Inputs mix what can be split (an uncompressed JSON lines file cut at line starts, a parquet file
cut at row groups) with what cannot (gzip), with bad rows and duplicates across parts.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcpipe.config import IngestConfig
from hpcpipe.errors import InputError, RunError
from hpcpipe.steps import ingest as ingest_module
from hpcpipe.steps.ingest import ingest
from hpcpipe.steps.ingest import parts as parts_module
from hpcpipe.steps.ingest.parts import plan_parts, planned_parts
from hpcpipe.steps.synth import write_synthetic

sys.path.insert(0, str(Path(__file__).parent))
from test_ingest import review, write_lines  # noqa: E402


def _inputs(tmp_path: Path) -> tuple[list[Path], Path]:
    """Three category files (one gz), a parquet copy of another, a file of bad lines whose
    duplicates repeat rows of the first file."""
    raw = tmp_path / "raw"
    made = write_synthetic(raw, 12_000, seed=9, files=3, fmt="jsonl", sizes="realistic")
    files = [Path(p) for p in made["reviews_files"]]
    pq_made = write_synthetic(tmp_path / "pq", 12_000, seed=9, fmt="parquet")
    table = pq.read_table(pq_made["reviews"]).slice(3_000, 6_000)  # the same products
    pq.write_table(table, raw / "more.parquet", row_group_size=1_000)
    first = [json.loads(x) for x in files[0].read_text().splitlines()[:40]]
    bad = [*first[:20], '{"rating": 5.0, "parent_asin": ', review(1, rating=9.0),
           review(2, timestamp=-1), *first[20:40]]
    write_lines(raw / "extra.jsonl.gz", bad)
    meta = Path(made["metadata"])
    return [files[0], files[1], raw / "more.parquet", raw / "extra.jsonl.gz", files[2]], meta


def _output(out: Path) -> dict[str, object]:
    buckets = {p.parent.name: pq.read_table(p) for p in sorted(out.glob("reviews/*/*.parquet"))}
    manifest = json.loads((out / "manifest.json").read_text())
    return {"buckets": buckets, "quarantine": (out / "quarantine.jsonl").read_text(),
            "products": pq.read_table(out / "products.parquet"),
            "counts": {k: manifest[k] for k in ("rows_in", "rows_out", "quarantined",
                                                "duplicates", "n_buckets", "reasons")}}


def _same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["counts"] == b["counts"]
    assert a["quarantine"] == b["quarantine"]
    assert a["products"].equals(b["products"])
    assert a["buckets"].keys() == b["buckets"].keys()
    for name, table in a["buckets"].items():
        assert table.equals(b["buckets"][name]), name


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    return _inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def one_part_each(inputs, tmp_path_factory) -> dict[str, object]:
    """The reference: every file one part, read in this process."""
    out = tmp_path_factory.mktemp("whole") / "out"
    ingest(*inputs, out, IngestConfig(target_bucket_rows=3_000))
    return _output(out)


def _small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parts_module, "PART_BYTES", 400_000)
    monkeypatch.setattr(parts_module, "PART_ROWS", 2_000)


def test_files_split_where_their_format_allows(inputs, monkeypatch):
    _small_parts(monkeypatch)
    parts = plan_parts(inputs[0])
    names = [Path(p.path).name for p in parts]
    assert names.count("extra.jsonl.gz") == 1  # gzip: never split
    assert names.count("more.parquet") == 3  # 6 row groups of 1,000 rows, 2,000 rows a part
    assert names.count(inputs[0][0].name) >= 3  # JSON lines cut at line starts
    for p in parts:
        if p.stop > 0:
            with open(p.path, "rb") as f:
                f.seek(p.stop - 1)
                assert f.read(1) == b"\n"
    assert [p.index for p in parts] == list(range(len(parts)))


@pytest.fixture(scope="module")
def one_gz(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """One realistic gzipped file (~5 MB of JSON lines) with bad lines spread through it."""
    import gzip

    raw = tmp_path_factory.mktemp("gz")
    made = write_synthetic(raw / "src", 12_000, seed=5, fmt="jsonl", sizes="realistic")
    lines = Path(made["reviews_files"][0]).read_bytes().splitlines(keepends=True)
    for at in (11_000, 6_000, 2_500, 700):  # from the end, so the positions hold
        lines[at:at] = [b'{"rating": 5.0, "parent_asin": \n', b"not json\n"]
    lines[9_000:9_000] = lines[100:140]  # duplicates, far from their first copies
    path = raw / "reviews.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=6) as f:
        f.write(b"".join(lines))
    return [path], Path(made["metadata"])


def test_a_gzipped_file_alone_is_split_on_its_index_with_the_output_of_one_reader(
        one_gz, tmp_path, monkeypatch, caplog):
    """Workers to spare (2 per file here): the .gz file is indexed with rapidgzip and read as
    several parts (uncompressed byte ranges at line starts), giving the output of one process
    reading it whole, quarantine line numbers included; a rerun with one worker keeps that plan
    and reads no part again."""
    from distributed import Client, LocalCluster

    _small_parts(monkeypatch)
    monkeypatch.setattr(parts_module, "GZ_SPLIT_WORKERS_PER_FILE", 2)
    whole = tmp_path / "whole"
    ingest(*one_gz, whole, IngestConfig(target_bucket_rows=3_000))
    out = tmp_path / "out"
    real_merge = ingest_module.merge_quarantine

    def killed(*args):  # in this process, once every part is read
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ingest_module, "merge_quarantine", killed)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client, \
            caplog.at_level(logging.INFO, logger="hpcpipe"), pytest.raises(KeyboardInterrupt):
        ingest(*one_gz, out, IngestConfig(target_bucket_rows=3_000), client=client)
    plan = json.loads(next(out.glob(".work-*/parts.json")).read_text())["parts"]
    assert len(plan) >= 10 and all(p["gz_index"] for p in plan), plan
    assert plan[0]["start"] == 0 and plan[-1]["stop"] == -1
    assert all(a["stop"] == b["start"] for a, b in zip(plan[:-1], plan[1:], strict=True))
    assert "reviews.jsonl.gz bytes 0-" in caplog.text
    monkeypatch.setattr(ingest_module, "merge_quarantine", real_merge)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hpcpipe"):
        ingest(*one_gz, out, IngestConfig(target_bucket_rows=3_000))  # one worker now
    assert caplog.text.count("already read, skipped") == len(plan)
    m = json.loads((out / "manifest.json").read_text())
    assert m["quarantined"] == 8 and m["duplicates"] == 40
    quarantined = [json.loads(x)["line"] for x in (out / "quarantine.jsonl").read_text()
                   .splitlines()]
    assert quarantined == [701, 702, 2503, 2504, 6005, 6006, 11047, 11048]
    _same(_output(out), _output(whole))


def test_gzipped_files_are_split_only_with_workers_to_spare_and_only_when_large(
        one_gz, inputs, tmp_path, monkeypatch):
    """The rule, not its timing: at least GZ_SPLIT_WORKERS_PER_FILE (4) workers per file, and
    a file of at least a quarter of a part compressed; uncompressed and parquet files split as
    before."""
    _small_parts(monkeypatch)
    gz = one_gz[0]
    assert len(planned_parts(tmp_path / "a", gz, 3, 1)) == 1
    assert not (tmp_path / "a" / "gzindex").exists()
    assert len(planned_parts(tmp_path / "b", gz, 4, 1)) > 10
    assert len(planned_parts(tmp_path / "c", gz + gz, 7, 1)) == 2
    monkeypatch.setattr(parts_module, "PART_BYTES", 4 * gz[0].stat().st_size + 4)
    assert len(planned_parts(tmp_path / "d", gz, 4, 1)) == 1  # too small to index
    assert not list((tmp_path / "d").glob("gzindex/*"))
    mixed = planned_parts(tmp_path / "e", inputs[0], 1, 1)
    assert [p.gz_index for p in mixed] == [None] * len(mixed)
    assert mixed == plan_parts(inputs[0])


@pytest.mark.parametrize("damage", ["cut in half", "bytes overwritten", "trailer CRC",
                                    "zero padding"])
def test_a_gzipped_file_rapidgzip_cannot_index_is_read_whole_and_judged_as_before(
        one_gz, tmp_path, monkeypatch, caplog, damage):
    """Where the index pass fails the file is not split: the reader of whole files decides, as
    without splitting (a damaged file is refused naming it; ISA-L reads a zero-padded one)."""
    _small_parts(monkeypatch)
    data = one_gz[0][0].read_bytes()
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes({"cut in half": data[: len(data) // 2],
                     "bytes overwritten": data[:600_000] + b"x" * 200 + data[600_200:],
                     "trailer CRC": data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:],
                     "zero padding": data + bytes(512)}[damage])
    with caplog.at_level(logging.WARNING, logger="hpcpipe"):
        parts = planned_parts(tmp_path / "work", [bad], 4, 1)
    assert len(parts) == 1 and parts[0].gz_index is None, parts
    assert "bad.jsonl.gz is read whole, not split" in caplog.text
    out = tmp_path / "out"
    if damage == "zero padding":
        m = ingest([bad], one_gz[1], out, IngestConfig(target_bucket_rows=3_000))
        assert m["rows_out"] == 12_000
        return
    with pytest.raises(InputError, match=r"bad\.jsonl\.gz is truncated or corrupt.*fetch it "
                                         "again"):
        ingest([bad], one_gz[1], out, IngestConfig(target_bucket_rows=3_000))


def test_a_truncated_gzipped_file_alone_on_a_cluster_is_refused_naming_it(one_gz, tmp_path,
                                                                           monkeypatch):
    """Split planning on: the index pass finds it cut short, the worker reading it whole
    refuses it with the message of any truncated file."""
    from distributed import Client, LocalCluster

    _small_parts(monkeypatch)
    monkeypatch.setattr(parts_module, "GZ_SPLIT_WORKERS_PER_FILE", 2)

    cut = tmp_path / "cut.jsonl.gz"
    data = one_gz[0][0].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        with pytest.raises(InputError, match=r"cut\.jsonl\.gz is truncated or corrupt.*fetch it "
                                             "again"):
            ingest([cut], one_gz[1], tmp_path / "out", IngestConfig(), client=client)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_parts_on_a_dask_cluster_give_the_output_of_one_part_per_file(inputs, one_part_each,
                                                                      tmp_path, monkeypatch,
                                                                      caplog):
    from distributed import Client, LocalCluster

    _small_parts(monkeypatch)
    out = tmp_path / "out"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client, \
            caplog.at_level(logging.INFO, logger="hpcpipe"):
        m = ingest(*inputs, out, IngestConfig(target_bucket_rows=3_000), client=client)
    assert "on 2 Dask workers" in caplog.text
    assert m["quarantined"] == 3 and m["duplicates"] >= 40
    quarantined = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(Path(q["source"]).name, q["line"]) for q in quarantined] == [
        ("extra.jsonl.gz", 21), ("extra.jsonl.gz", 22), ("extra.jsonl.gz", 23)]
    _same(_output(out), one_part_each)
    assert not list(out.glob(".work-*")) and not list(out.glob(".tmp-*"))


def _killed_after_two_buckets(inputs, out: Path, monkeypatch) -> list[tuple]:
    """An in-process ingest killed as it starts its third bucket; the two finished buckets'
    arguments to finish_bucket (which is itself again afterwards)."""
    real_finish = ingest_module.finish_bucket
    done: list[tuple] = []

    def dies_after_two(*args):
        if len(done) == 2:
            raise KeyboardInterrupt("killed")
        done.append(args)
        return real_finish(*args)

    monkeypatch.setattr(ingest_module, "finish_bucket", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        ingest(*inputs, out, IngestConfig(target_bucket_rows=3_000))
    monkeypatch.setattr(ingest_module, "finish_bucket", real_finish)
    return done


def test_a_killed_ingest_does_not_read_finished_parts_again(inputs, one_part_each, tmp_path,
                                                             monkeypatch, caplog):
    _small_parts(monkeypatch)
    out = tmp_path / "out"
    _killed_after_two_buckets(inputs, out, monkeypatch)
    assert not (out / "manifest.json").exists() and not (out / "reviews").exists()
    read = []
    real_read = ingest_module.read_part
    monkeypatch.setattr(ingest_module, "read_part",
                        lambda part, *a: read.append(part) or real_read(part, *a))
    with caplog.at_level(logging.INFO, logger="hpcpipe"):
        ingest(*inputs, out, IngestConfig(target_bucket_rows=3_000))
    n_parts = len(plan_parts(inputs[0]))
    assert caplog.text.count("already read, skipped") == n_parts
    assert caplog.text.count("already written, skipped") == 2
    assert "continuing the ingest" in caplog.text
    _same(_output(out), one_part_each)


def _background_done() -> None:
    """Wait for the deletes queued in this process's background thread."""
    if parts_module._BACKGROUND is not None:
        parts_module._BACKGROUND.submit(lambda: None).result()


def test_an_ingest_killed_after_installing_its_reviews_takes_them_back(inputs, one_part_each,
                                                                       tmp_path, monkeypatch,
                                                                       caplog):
    """A finished bucket's spill is deleted, so its output is its only copy: a kill between the
    rename of the reviews into place and the manifest must not leave a rerun rebuilding buckets
    from spill that is gone (it wrote them empty), nor reading the input again."""
    _small_parts(monkeypatch)
    out = tmp_path / "out"
    real_products = ingest_module._write_products

    def killed(*args):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ingest_module, "_write_products", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest(*inputs, out, IngestConfig(target_bucket_rows=3_000))
    _background_done()
    work = next(out.glob(".work-*"))
    assert (out / "reviews").is_dir() and not (work / "reviews").exists()
    assert not (out / "manifest.json").exists()
    assert not list(work.glob("parts/*/n*/*.arrows"))  # every finished bucket's spill deleted
    monkeypatch.setattr(ingest_module, "_write_products", real_products)
    with caplog.at_level(logging.INFO, logger="hpcpipe"):
        m = ingest(*inputs, out, IngestConfig(target_bucket_rows=3_000))
    assert "took the reviews installed by the killed ingest back" in caplog.text
    assert caplog.text.count("already written, skipped") == m["n_buckets"]
    assert caplog.text.count("already read, skipped") == len(plan_parts(inputs[0]))
    _same(_output(out), one_part_each)
    assert not list(out.glob(".work-*"))


def test_a_finished_bucket_whose_output_is_gone_is_refused_not_written_empty(inputs, tmp_path,
                                                                             monkeypatch):
    _small_parts(monkeypatch)
    out = tmp_path / "out"
    monkeypatch.setattr(ingest_module, "_install",
                        lambda *a: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        ingest(*inputs, out, IngestConfig(target_bucket_rows=3_000))
    monkeypatch.undo()
    _small_parts(monkeypatch)
    work = next(out.glob(".work-*"))
    (work / "reviews" / "bucket=00001" / "part-0.parquet").unlink()
    with pytest.raises(RunError, match=r"bucket 1 of the unfinished ingest in .*\.work-.* was "
                                       r"written, and its spill deleted, but reviews/bucket=00001/"
                                       r"part-0\.parquet is gone; remove .* to ingest again"):
        ingest(*inputs, out, IngestConfig(target_bucket_rows=3_000))
    assert not (out / "manifest.json").exists()


def test_a_second_run_of_a_bucket_never_writes_it_from_a_spill_deleted_under_it(
        inputs, tmp_path, monkeypatch):
    """Two runs of one bucket's task at once (a worker Dask took for lost can still be running
    it): the first finishes and deletes the bucket's spill while the second reads it. The second
    keeps the first's output when it finds it written, and fails otherwise; it never writes the
    bucket from the spill files that are left."""
    _small_parts(monkeypatch)
    out = tmp_path / "out"
    done = _killed_after_two_buckets(inputs, out, monkeypatch)
    _background_done()
    work, bucket, n_parts, n_buckets = done[0][0], done[0][1], done[0][2], done[0][3]
    stats = Path(work) / "buckets" / f"{bucket:05d}.json"
    written = Path(work) / "reviews" / f"bucket={bucket:05d}" / "part-0.parquet"
    first_output, first_stats = written.read_bytes(), stats.read_bytes()
    stats.unlink()  # the second run looked before the first had finished
    real_read = parts_module.read_spill

    def first_run_finishes_meanwhile(path):
        stats.write_bytes(first_stats)
        return real_read(path)

    monkeypatch.setattr(parts_module, "read_spill", first_run_finishes_meanwhile)
    assert parts_module.finish_bucket(work, bucket, n_parts, n_buckets)["skipped"]
    assert written.read_bytes() == first_output
    monkeypatch.setattr(parts_module, "read_spill", real_read)
    stats.unlink()
    with pytest.raises(RunError, match=rf"the spill of bucket {bucket} of the unfinished ingest "
                                       r"in .* is incomplete \(parts/p\d+/n\d+/\d+\.arrows.* "
                                       r"gone\); remove .* to ingest again from the start"):
        parts_module.finish_bucket(work, bucket, n_parts, n_buckets)
    assert written.read_bytes() == first_output


def test_a_part_cut_short_is_read_again_from_its_start(inputs, one_part_each, tmp_path,
                                                        monkeypatch):
    """A part killed while spilling leaves spill files but no done.json: redone whole."""
    _small_parts(monkeypatch)
    out = tmp_path / "out"
    real_read = ingest_module.read_part

    def dies_in_part_three(part, *a):
        if part.index == 2:
            (parts_module.part_dir(Path(a[0]), 2) / "n5").mkdir(parents=True)
            (parts_module.part_dir(Path(a[0]), 2) / "n5" / "00000.parquet").write_bytes(b"junk")
            raise KeyboardInterrupt("killed")
        return real_read(part, *a)

    monkeypatch.setattr(ingest_module, "read_part", dies_in_part_three)
    with pytest.raises(KeyboardInterrupt):
        ingest(*inputs, out, IngestConfig(target_bucket_rows=3_000))
    monkeypatch.setattr(ingest_module, "read_part", real_read)
    ingest(*inputs, out, IngestConfig(target_bucket_rows=3_000))
    _same(_output(out), one_part_each)


def test_rows_numbered_per_part_keep_the_first_in_input_order(tmp_path, monkeypatch):
    """Duplicates in different parts: the one of the earlier part is kept, on any worker."""
    _small_parts(monkeypatch)
    monkeypatch.setattr(parts_module, "PART_BYTES", 3_000)
    rows = [review(i) for i in range(100)]
    rows += [dict(review(i), title=f"second copy {i}") for i in range(0, 100, 10)]
    write_lines(tmp_path / "r.jsonl", rows)
    write_lines(tmp_path / "m.jsonl", [{"parent_asin": f"P{i}"} for i in range(7)])
    assert len(plan_parts([tmp_path / "r.jsonl"])) > 3
    m = ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", tmp_path / "out",
               IngestConfig(keep_text=True))
    titles = pa.concat_tables(pq.read_table(p) for p in (tmp_path / "out").glob(
        "reviews/*/*.parquet")).column("title").to_pylist()
    assert m["duplicates"] == 10 and "second copy 0" not in titles


@pytest.mark.slurm
def test_ingest_on_two_nodes_uses_both_and_matches_one_node(slurm_cluster, tmp_path):
    """``hpcpipe submit --steps ingest`` with ingest.nodes=2 and 6 CPUs: the job asks for 2 nodes
    x 3 tasks and starts them under srun; the SLURMRunner's scheduler and client take n1's first
    two tasks, its third and n2's tasks are workers; parts and buckets run on both nodes (the log
    names them) and the output is that of one process."""
    import json
    import subprocess

    from hpcli import hp, steps

    made = write_synthetic(tmp_path / "raw", 30_000, seed=3, files=6, sizes="realistic")
    hp(tmp_path, "submit", "--steps", "ingest", "--name", "two",
       "--set", f"data.reviews=[{','.join(made['reviews_files'])}]",
       "--set", f"data.metadata={made['metadata']}", "--set", "ingest.target_bucket_rows=3000",
       "--set", "ingest.cpus=6", "--set", "ingest.nodes=2", "--set", "ingest.mem=4G",
       "--set", "ingest.time=5")
    run = next((tmp_path / "runs").iterdir())
    script = (run / "sbatch" / "ingest.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=3" in script, script
    job = json.loads((run / "state.json").read_text())["steps"]["ingest"]["jobs"][0]["job_id"]
    state = slurm_cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                                     timeout=240)
    out = Path(steps(tmp_path)["ingest"]["log"])
    log = out.read_text()
    assert state == "COMPLETED", log
    assert "2 nodes x" in log and "client on rank 1" in log and "on 3 Dask workers" in log, log
    assert " on n1" in log and " on n2" in log, log  # parts or buckets ran on both nodes
    one = tmp_path / "one-node"
    ingest([Path(p) for p in made["reviews_files"]], made["metadata"], one,
           IngestConfig(target_bucket_rows=3_000))
    _same(_output(run / "ingest"), _output(one))
    assert subprocess.run(["grep", "-c", "part 6/6", str(out)], capture_output=True,
                          text=True).stdout.strip() == "1"


def test_bad_input_found_on_a_worker_is_refused_naming_the_file(inputs, tmp_path):
    """A truncated gzip among several files, read on a Dask worker: the step fails with the
    same what/where/how-to-fix message as in one process, and nothing looks complete."""
    from distributed import Client, LocalCluster

    from hpcpipe.errors import InputError

    files, meta = inputs
    cut = tmp_path / "cut.jsonl.gz"
    data = (files[3]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        with pytest.raises(InputError, match=r"cut\.jsonl\.gz is truncated or corrupt.*fetch it "
                                             "again"):
            ingest([files[0], cut, files[1]], meta, tmp_path / "out", IngestConfig(),
                   client=client)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not (tmp_path / "out" / "reviews").exists()
