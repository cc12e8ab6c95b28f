"""Bad input that tests/test_ingest.py does not already cover, and bad configs on the real cluster.

Every bad row is quarantined with its file, line and reason, and the counts add up (nothing is
dropped silently); an input that cannot be used as a whole is refused naming the file; a bad config
is refused naming the key before a run folder is made or a job is queued. The list of which test
covers which bad input is in the README (Faults and bad input).
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcpipe.config import IngestConfig
from hpcpipe.errors import InputError
from hpcpipe.steps.ingest import ingest

TS = 1_600_000_000_000  # 2020-09-13, in ms
PRODUCTS = [f"P{i}" for i in range(7)]


def review(i: int, **over) -> dict:
    r = {"rating": 4.0, "title": "ok", "text": f"text {i}", "images": [], "asin": f"A{i % 7}",
         "parent_asin": f"P{i % 7}", "user_id": f"U{i}", "timestamp": TS + i * 1000,
         "helpful_vote": 1, "verified_purchase": True}
    r.update(over)
    return r


def write_lines(path: Path, lines: list[str | dict]) -> None:
    data = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode() + b"\n"
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def write_meta(path: Path) -> None:
    write_lines(path, [{"parent_asin": p, "title": f"Thing {p}", "main_category": "Toys",
                        "store": "S"} for p in PRODUCTS])


def quarantine(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]


def cfg() -> IngestConfig:
    return IngestConfig(target_bucket_rows=500_000)


def test_wrongly_typed_fields_in_a_gz_file_are_quarantined_by_line(tmp_path: Path) -> None:
    """Ratings and timestamps of the wrong JSON type, and odd values of the other fields."""
    src = tmp_path / "r.jsonl.gz"
    lines = [review(i) for i in range(60)] + [
        review(60, rating=True),  # line 61
        review(61, rating=None),
        review(62, timestamp="1600000000000"),
        review(63, timestamp=1.6e12 + 0.5),
        review(64, rating="4.5"),  # 65
        '{"rating": NaN, "parent_asin": "P1", "user_id": "n", "timestamp": 1600000000000}',
        review(66, parent_asin=""),
        review(67, user_id=12345),
        review(68, rating=0.5),
        review(69, timestamp=0),  # 70
        review(71, helpful_vote="many"),
        review(72, verified_purchase="yes"),
        review(73, parent_asin=["P1"]),
    ]
    write_lines(src, lines)
    write_meta(tmp_path / "m.jsonl")
    m = ingest([src], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    got = {q["line"]: q["reason"] for q in quarantine(tmp_path / "out")}
    assert got == {
        61: "rating is not a number", 62: "missing required field: rating",
        63: "timestamp is not an integer", 64: "timestamp is not an integer",
        65: "rating is not a number", 66: "rating is not a number",
        67: "missing required field: parent_asin", 68: "user_id is not a string",
        69: "rating out of range [1, 5]", 70: "timestamp before 1973: not milliseconds since 1970",
        71: "helpful_vote is not an integer", 72: "verified_purchase is not true/false",
        73: "parent_asin is not a string"}
    assert all(q["source"] == str(src) and q["raw"] for q in quarantine(tmp_path / "out"))
    assert m["rows_in"] == 73 and m["rows_out"] == 60 and m["quarantined"] == 13
    assert m["rows_in"] == m["rows_out"] + m["quarantined"] + m["duplicates"]
    assert sum(m["reasons"].values()) == 13


@pytest.mark.parametrize("keep_text", [False, True])
def test_what_a_json_line_means_edge_by_edge(tmp_path: Path, keep_text: bool) -> None:
    """The JSON decoder's reading of odd lines (reading.py's module doc), with the review words
    skipped (the default) and kept. ``null`` alone in a block once crashed the process (pyarrow
    26's JSON reader: SIGSEGV), so it is tested alone in a file too."""
    src = tmp_path / "r.jsonl.gz"
    dup = json.dumps(review(62))[:-1] + ', "rating": 2.0}'
    lines = [review(i) for i in range(60)] + [
        "null",  # line 61
        "[1, 2]",
        dup,  # a repeated key: the last value, as Python's json
        review(63, extra=["\u00e9", {"deep": [1.5, None]}]),
        review(64, rating=1e400),  # 65: json.dumps writes Infinity
        review(65, timestamp=1 << 64),
        review(66, helpful_vote=-(1 << 63) - 1),
        review(67, text="caf\u00e9 \U0001F600 \"q\"\n"),
        review(68, text=None),
    ]
    data = ("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n").encode()
    # A number too large for a double where ingest does not look, and bytes that are not UTF-8
    # there: no reason to refuse a review. The same bytes in the text refuse it.
    data += (json.dumps(review(69))[:-1] + ', "other": 1E400, "junk": "\xff"}\n').encode("latin-1")
    data += json.dumps(review(70, text="xx")).replace('"xx"', '"\xfe"').encode("latin-1") + b"\n"
    src.write_bytes(gzip.compress(data))
    write_meta(tmp_path / "m.jsonl")
    m = ingest([src], tmp_path / "m.jsonl", tmp_path / "out",
               IngestConfig(target_bucket_rows=500_000, keep_text=keep_text))
    got = {q["line"]: q["reason"] for q in quarantine(tmp_path / "out")}
    assert got == {61: "not a JSON object", 62: "not a JSON object",
                   65: "rating is not a number", 66: "timestamp does not fit in 64 bits",
                   67: "helpful_vote does not fit in 64 bits", 71: "non-UTF-8 bytes"}
    out = pa.concat_tables(pq.read_table(f) for f in sorted((tmp_path / "out").glob(
        "reviews/bucket=*/part-0.parquet"))).to_pylist()
    by_user = {r["user_id"]: r for r in out}
    assert by_user["U62"]["rating"] == 2.0
    assert by_user["U67"]["text_chars"] == len("caf\u00e9 \U0001F600 \"q\"\n") == 11
    assert by_user["U68"]["text_chars"] == 0
    assert {"U63", "U69"} <= set(by_user)
    assert (m["rows_in"], m["rows_out"], m["quarantined"]) == (71, 65, 6)

    alone = tmp_path / "alone"
    alone.mkdir()
    write_lines(alone / "r.jsonl", [review(i) for i in range(60)])
    with (alone / "r.jsonl").open("a") as f:
        f.write("null\n")
    m = ingest([alone / "r.jsonl"], tmp_path / "m.jsonl", alone / "out", cfg())
    assert [q["reason"] for q in quarantine(alone / "out")] == ["not a JSON object"]


def test_a_line_is_one_review_whatever_else_its_block_holds(tmp_path: Path) -> None:
    """Two objects on one line are one malformed line, and an object over two lines two; so they
    stay when a blank line or that object in the same block evens out the count of objects and
    lines (decoding a block with msgspec's decode_lines took the two objects as two reviews, and
    numbered the lines after them wrongly, when its count of objects matched the lines)."""
    one = [json.dumps(review(i)) for i in range(70)]
    over_two_lines = one[62].replace(", ", ",\n", 1)
    lines = (one[:30] + [f"{one[60]} {one[61]}", ""] + one[30:60] + [over_two_lines]
             + [f"{one[63]}{one[64]}"] + one[65:])
    src = tmp_path / "r.jsonl"
    write_lines(src, lines)
    data = src.read_bytes()
    assert data.count(b"\n") == 70 and data.count(b'"rating"') == 70  # objects = lines
    write_meta(tmp_path / "m.jsonl")
    m = ingest([src], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    assert [(q["line"], q["reason"]) for q in quarantine(tmp_path / "out")] == [
        (31, "malformed JSON"), (63, "malformed JSON"), (64, "malformed JSON"),
        (65, "malformed JSON")]
    out = pa.concat_tables(pq.read_table(f) for f in sorted((tmp_path / "out").glob(
        "reviews/bucket=*/part-0.parquet")))
    assert sorted(out.column("user_id").to_pylist()) == sorted(
        f"U{i}" for i in [*range(60), *range(65, 70)])
    assert (m["rows_in"], m["rows_out"], m["quarantined"]) == (69, 65, 4)


def test_windows_line_ends_are_read_like_unix_ones_in_one_call() -> None:
    """``}\\r\\n{`` separates two lines too: such a file keeps the one-call decoding of a block
    (``starts`` stays unset there) and gives the same rows."""
    from hpcpipe.steps.ingest.reading import READ_SCHEMA_LENGTHS, _Block, _parse_json_block

    unix = ("\n".join(json.dumps(review(i)) for i in range(50)) + "\n").encode()
    windows = unix.replace(b"\n", b"\r\n")
    (a, refused_a), (b, refused_b) = (
        _parse_json_block(_Block(x[:x.index(b"\n") + 1], memoryview(x)[x.index(b"\n") + 1:],
                                 False), READ_SCHEMA_LENGTHS) for x in (unix, windows))
    assert a.table.equals(b.table) and a.table.num_rows == 50 and not refused_a + refused_b
    assert a.starts is None and b.starts is None


@pytest.mark.parametrize("block_bytes", [97, 700, 4096])
def test_where_the_blocks_fall_changes_nothing(tmp_path: Path, monkeypatch,
                                               block_bytes: int) -> None:
    """The same odd file read in blocks of a few lines, of less than one line, and whole: the same
    rows, quarantine lines and reasons. Blocks cut lines (the cut line completes the next block's
    first piece), a line can be longer than a block, and bad lines fall at a block's start, its
    end and across its cut."""
    from hpcpipe.steps.ingest import reading

    lines: list[str | dict] = [review(i) for i in range(40)]
    lines[3] = '{"rating": 4'  # malformed
    lines[9] = ""
    lines[10] = json.dumps(review(10)) + " " + json.dumps(review(110))  # two objects
    lines[17] = review(17, text="x" * 3000)  # longer than most blocks
    lines[18] = review(18, rating="5")
    lines[25] = json.dumps(review(25)).replace(", ", ",\n", 1)  # an object over two lines
    lines[31] = "   "
    src = tmp_path / "r.jsonl"
    write_lines(src, lines)
    with src.open("ab") as f:
        f.write(json.dumps(review(50)).encode() + b"\r\n" + json.dumps(review(51))[:-3].encode())
    write_meta(tmp_path / "m.jsonl")

    def read(out: Path) -> tuple[object, ...]:
        m = ingest([src], tmp_path / "m.jsonl", out, cfg())
        rows = pa.concat_tables(pq.read_table(f) for f in sorted(out.glob(
            "reviews/bucket=*/part-0.parquet"))).sort_by("user_id").to_pylist()
        return rows, [(q["line"], q["reason"]) for q in quarantine(out)], m["rows_in"]

    whole = read(tmp_path / "whole")
    assert whole[1] == [(4, "malformed JSON"), (11, "malformed JSON"),
                        (19, "rating is not a number"), (26, "malformed JSON"),
                        (27, "malformed JSON"), (43, "truncated last line")]
    monkeypatch.setattr(reading, "BLOCK_BYTES", block_bytes)
    assert read(tmp_path / "blocks") == whole


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 17, 4099])
@pytest.mark.parametrize("byte", [10, 92])
def test_newlines_are_found_wherever_they_fall(size: int, byte: int) -> None:
    """The 8-bytes-at-a-time search (newlines, and backslashes in a text) gives numpy's plain
    answer: single bytes, runs of them (two in one word), and the tail after the last whole
    word."""
    import numpy as np

    from hpcpipe.steps.ingest.jsontext import byte_positions

    rng = np.random.default_rng(size)
    for share in (0.0, 0.02, 0.3, 1.0):
        block = np.where(rng.random(size) < share, byte, 65).astype(np.uint8).tobytes()
        expect = np.flatnonzero(np.frombuffer(block, np.uint8) == byte)
        assert byte_positions(block, byte).tolist() == expect.tolist()


def test_bad_rows_in_the_second_file_name_that_file_and_its_own_line(tmp_path: Path) -> None:
    write_lines(tmp_path / "a.jsonl", [review(i) for i in range(30)])
    write_lines(tmp_path / "b.jsonl", [review(i) for i in range(30, 60)]
                + ['{"rating": 4', review(5)])  # a malformed line, then a duplicate of a.jsonl:6
    write_meta(tmp_path / "m.jsonl")
    m = ingest([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "m.jsonl",
               tmp_path / "out", cfg())
    assert [(q["source"], q["line"], q["reason"]) for q in quarantine(tmp_path / "out")] == [
        (str(tmp_path / "b.jsonl"), 31, "malformed JSON")]
    assert (m["rows_in"], m["rows_out"], m["quarantined"], m["duplicates"]) == (62, 60, 1, 1)


@pytest.mark.parametrize("case", ["empty_gz", "blank_lines", "not_gzip", "not_parquet",
                                  "parquet_no_rating", "parquet_seconds", "json_array"])
def test_unusable_inputs_are_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    write_meta(tmp_path / "m.jsonl")
    rows = [review(i) for i in range(60)]
    expect = {
        "empty_gz": "the input is empty", "blank_lines": "the input is empty",
        "not_gzip": "truncated or corrupt", "not_parquet": "not a readable parquet file",
        "parquet_no_rating": "has no column(s) rating",
        "parquet_seconds": "looks like seconds since 1970",
        "json_array": "1 not a JSON object",
    }[case]
    if case == "empty_gz":
        bad = tmp_path / "r.jsonl.gz"
        bad.write_bytes(gzip.compress(b""))
    elif case == "blank_lines":
        bad = tmp_path / "r.jsonl"
        bad.write_text("\n  \n\n")
    elif case == "not_gzip":
        bad = tmp_path / "r.jsonl.gz"
        write_lines(tmp_path / "r.jsonl", rows)
        bad.write_bytes((tmp_path / "r.jsonl").read_bytes())
    elif case == "not_parquet":
        bad = tmp_path / "r.parquet"
        bad.write_text("\n".join(json.dumps(r) for r in rows))
    elif case == "parquet_no_rating":
        bad = tmp_path / "r.parquet"
        pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "rating"}
                                             for r in rows]), bad)
    elif case == "parquet_seconds":
        bad = tmp_path / "r.parquet"
        pq.write_table(pa.Table.from_pylist([{**r, "timestamp": r["timestamp"] / 1000}
                                             for r in rows]), bad)
    else:  # one JSON array instead of JSON lines
        bad = tmp_path / "r.json"
        bad.write_text(json.dumps(rows))
    with pytest.raises(InputError) as err:
        ingest([bad], tmp_path / "m.jsonl", tmp_path / "out", cfg())
    assert str(bad) in str(err.value) and expect in str(err.value), str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_counts_and_reasons_reach_the_step_log(tmp_path: Path) -> None:
    """A local ingest run on a file with bad rows: the log says how many and why."""
    src = tmp_path / "data" / "r.jsonl"
    src.parent.mkdir()
    write_lines(src, [review(i) for i in range(80)] + [review(80, rating=9.0),
                                                         review(81, timestamp=-1), review(3)])
    write_meta(tmp_path / "data" / "m.jsonl")
    proc = subprocess.run(
        ["hpcpipe", "submit", "--local", "--wait", "--steps", "ingest", "--set",
         f"data.reviews=[{src}]", "--set", f"data.metadata={tmp_path / 'data' / 'm.jsonl'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HPCPIPE_RUNS_DIR": str(tmp_path / "runs")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = subprocess.run(["hpcpipe", "logs", "ingest"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "HPCPIPE_RUNS_DIR": str(tmp_path / "runs")},
                         check=True).stdout
    assert "83 rows in, 80 out, 2 quarantined, 1 duplicates" in log, log
    assert "quarantined 1: rating out of range [1, 5]" in log
    assert "quarantined 1: timestamp is negative" in log


# ---------------------------------------------------------------------------------------------
# Bad configs, on the real cluster: refused before anything is queued.

BAD_CONFIGS = [
    (["--set", "train.epoch=2"], "unknown config key 'train.epoch'; did you mean 'epochs'"),
    (["--set", "trian.epochs=2"], "unknown config key 'trian'"),
    (["--config", "{unknown_file}"], "unknown config key 'features.worker'"),
    (["--set", "train.batch_size=big"], "train.batch_size: expected an integer, got 'big'"),
    (["--set", "ingest.cpus=1.5"], "ingest.cpus: expected an integer, got 1.5"),
    (["--set", "data.reviews=5"], "data.reviews: expected a list of"),
    (["--cpus", "0"], "Invalid value for '--cpus'"),
    (["--set", "train.gpus=0"], "train.gpus must be a positive integer, got 0"),
    (["--set", "features.cpus=-4"], "features.cpus must be a positive integer, got -4"),
    (["--set", "ingest.target_bucket_rows=0"], "ingest.target_bucket_rows must be a positive"),
    (["--set", "train.lr=-0.1"], "train.lr must be positive"),
    (["--time", "2h"], "ingest.time: '2h' is not a Slurm time limit"),
    (["--set", "train.time=1:00:00:00"], "train.time: '1:00:00:00' is not a Slurm time limit"),
    (["--set", "features.mem=-5G"], "features.mem: '-5G' is not a memory size"),
    (["--set", "train.model=/nonexistent/model"],
     "train.model: /nonexistent/model is not a local Hugging Face model folder"),
    (["--set", "train.model={empty_dir}"], "is not a local Hugging Face model folder"),
    (["--set", "data.reviews=[/nonexistent/r.jsonl.gz]"], "data.reviews[0]: /nonexistent/r.jsonl.gz"
     " does not exist"),
]


def test_time_limits_given_unquoted_stay_time_limits(tmp_path: Path) -> None:
    """YAML 1.1 reads an unquoted 12:00:00 as the base-60 integer 43200, which a time limit would
    take as 43200 minutes (30 days): --set and config files keep it as written."""
    from hpcpipe.config import load_config

    (tmp_path / "c.yaml").write_text("train:\n  time: 12:00:00\n  lr: 1e-3\n")
    assert load_config(tmp_path / "c.yaml").train.time == "12:00:00"
    cfg = load_config(None, ["ingest.time=1:30:00", "features.time=90", "train.time=2-00:00:00"])
    assert (cfg.ingest.time, cfg.features.time, cfg.train.time) == ("1:30:00", "90", "2-00:00:00")


def _our_jobs(token: str) -> list[str]:
    """Names of jobs, queued or in accounting, whose name carries ``token``."""
    queued = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True,
                            check=True).stdout
    acct = subprocess.run(["sacct", "-X", "-n", "-P", "-S", "now-1hours", "-o", "JobName%200"],
                          capture_output=True, text=True, check=True).stdout
    return [n for n in (queued + acct).split() if token in n]


@pytest.mark.slurm
def test_bad_configs_are_refused_before_anything_is_queued(tmp_path: Path, slurm_cluster) -> None:
    token = f"badcfg{secrets.token_hex(4)}"
    (tmp_path / "unknown.yaml").write_text("features:\n  worker: 3\n")
    (tmp_path / "empty-model").mkdir()
    env = {**os.environ, "HPCPIPE_RUNS_DIR": str(tmp_path / "runs")}
    for args, message in BAD_CONFIGS:
        args = [a.format(unknown_file=tmp_path / "unknown.yaml",
                         empty_dir=tmp_path / "empty-model") for a in args]
        proc = subprocess.run(["hpcpipe", "submit", "--name", token, *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode != 0, (args, proc.stdout)
        assert message.format(empty_dir=tmp_path / "empty-model") in proc.stderr, \
            (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "runs").exists(), (args, "a run folder was created")
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
    assert _our_jobs(token) == [], "a bad config reached the queue"

    # The same check finds a job when one is submitted: the absence above is not a blind spot.
    ok = subprocess.run(["hpcpipe", "submit", "--name", token, "--steps", "ingest", "--set",
                         "data.synth_reviews=1000", "--set", "ingest.time=5"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=60, env=env)
    assert ok.returncode == 0, ok.stderr
    state = json.loads(next((tmp_path / "runs").iterdir()).joinpath("state.json").read_text())
    job = state["steps"]["ingest"]["jobs"][0]["job_id"]
    try:
        deadline = time.time() + 10
        while not (names := _our_jobs(token)) and time.time() < deadline:
            time.sleep(0.2)
        assert names and set(names) == {f"ingest.{state['run_id']}"}
    finally:
        slurm_cluster.cancel(job)
