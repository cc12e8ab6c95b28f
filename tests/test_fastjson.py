"""fastjson: the compiled reader accepts a block only where msgspec's reading accepts every line,
and then gives the same columns (hpcpipe/steps/ingest/fastjson.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hpcpipe.config import IngestConfig
from hpcpipe.steps.ingest import fastjson, ingest, reading
from hpcpipe.steps.ingest.reading import READ_SCHEMA_LENGTHS

read_lines = fastjson.read_lines

STRING_PIECES = ["abc", "Great product", " ", "\\\"", "\\\\", "\\n", "\\t", "\\/", "\\u00e9",
                 "\\ud83d\\ude00", "é", "😀", "\u2028", "中文", "\\b\\f\\r"]
BAD_STRING_PIECES = ["\\ud800", "\\udc00x", "\\x", "\\u12", "\x01", "\t"]
BAD_STRING_BYTES = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf5\x80\x80\x80"]
NUMBERS = ["4", "4.0", "4.50", "5", "1", "-0", "0", "0.5", "-3.25", "1e2", "1E+2", "2.5e-1",
           "123456789012345678", "1234567890123456789", "9223372036854775807",
           "99999999999999999999", "3.14159265358979311", "5.0000000000000001",
           "1516543721231", "9007199254740993", "-9007199254740993"]
BAD_NUMBERS = ["01", "1.", ".5", "-", "+1", "1e", "0x10", "NaN", "Infinity", "--1"]
LITERALS = ["true", "false", "null"]
BAD_LITERALS = ["nul", "True", "nulll", "tru"]


def _string(rng: random.Random, bad: float) -> bytes:
    if rng.random() < bad:
        if rng.random() < 0.5:
            return b'"ok' + rng.choice(BAD_STRING_BYTES) + b'"'
        return ('"' + rng.choice(BAD_STRING_PIECES) + '"').encode()
    return ('"' + "".join(rng.choice(STRING_PIECES) for _ in range(rng.randrange(4)))
            + '"').encode()


def _value(rng: random.Random, bad: float, depth: int = 0) -> bytes:
    kind = rng.randrange(6 if depth < 3 else 4)
    if kind == 0:
        return _string(rng, bad)
    if kind == 1:
        pool = BAD_NUMBERS if rng.random() < bad else NUMBERS
        return rng.choice(pool).encode()
    if kind == 2:
        pool = BAD_LITERALS if rng.random() < bad else LITERALS
        return rng.choice(pool).encode()
    if kind == 3:
        return _string(rng, 0)
    if kind == 4:
        items = [_value(rng, bad, depth + 1) for _ in range(rng.randrange(3))]
        return b"[" + b", ".join(items) + (b",]" if rng.random() < bad else b"]")
    members = [_string(rng, bad) + b":" + _value(rng, bad, depth + 1)
               for _ in range(rng.randrange(3))]
    return b"{" + b",".join(members) + b"}"


def _typed(rng: random.Random, key: str, bad: float) -> bytes:
    """A value of the right type for ``key`` (most of the time)."""
    if rng.random() < 0.1:
        return b"null"
    if rng.random() < bad:
        return _value(rng, bad)
    if key == "rating":
        # The last three: a division of the digits by a power of ten would round them wrongly.
        return rng.choice(["1.0", "5.0", "4", "3.5", "2.25", "-0.0", "1e0", "4.0000000000000001",
                           "9007199254740993", "3875334047727647.7", "410.458098536264801",
                           "7933407820.7170746"]).encode()
    if key in ("timestamp", "helpful_vote"):
        return str(rng.choice([0, -5, 1516543721231, 10**18 - 1, 10**18, 2**63 - 1, 2**63])
                   ).encode() if rng.random() < 0.3 else str(rng.randrange(10**13)).encode()
    if key == "verified_purchase":
        return rng.choice([b"true", b"false"])
    if key == "text":
        return _string(rng, bad)
    return ('"' + rng.choice(["B00X", "A2H4FXMRVOC4", "", "é1", "a\\u0062", "\\\"q"]) + '"'
            ).encode()


KEYS = ["rating", "asin", "parent_asin", "user_id", "timestamp", "helpful_vote",
        "verified_purchase", "text", "title", "images", "other"]


def _line(rng: random.Random, bad: float) -> bytes:
    keys = rng.sample(KEYS, rng.randrange(len(KEYS) + 1))
    if keys and rng.random() < 0.15:
        keys.append(rng.choice(keys))  # a repeated key
    ws = [b"", b"", b" ", b"\t", b" \r"] if rng.random() < 0.2 else [b""]
    members = []
    for key in keys:
        name = json.dumps(key).encode()
        if rng.random() < 0.03:
            name = b'"r\\u0061ting"'  # a key written with an escape
        value = _typed(rng, key, bad) if key in fastjson.FIELDS else _value(rng, bad)
        members.append(rng.choice(ws) + name + rng.choice(ws) + b":" + rng.choice(ws) + value
                       + rng.choice(ws))
    line = b"{" + b",".join(members) + b"}"
    odd = rng.random()
    if odd < bad / 4:
        return line + b" " + line  # two objects on a line
    if odd < bad / 2:
        return rng.choice([b"", b"   ", b"null", b"[]", b"{", b' {"a":1}', line[:-1]])
    return line


def _msgspec_reading(data: bytes, monkeypatch: pytest.MonkeyPatch
                     ) -> tuple[pa.Table, int, list[tuple[int, str, str]]]:
    """The block read as before fastjson (msgspec's fast path, or a line at a time)."""
    with monkeypatch.context() as m:
        m.setattr(fastjson, "read_lines", lambda piece, schema: None)
        parsed, refused = reading._parse_json_block(
            reading._Block(data, memoryview(b""), True), READ_SCHEMA_LENGTHS)
    return parsed.table, parsed.lines, refused


def _assert_same(fast: pa.Table, ref: pa.Table) -> None:
    assert fast.schema == ref.schema
    assert fast.to_pylist() == ref.to_pylist()
    ratings = [np.asarray(t.column("rating").fill_null(1.0)) for t in (fast, ref)]
    assert (np.signbit(ratings[0]) == np.signbit(ratings[1])).all()


@pytest.mark.parametrize("bad", [0.0, 0.02, 0.2])
def test_what_it_accepts_msgspec_reads_the_same_way(bad: float,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(int(bad * 1000))
    accepted = declined = 0
    for _ in range(1500):
        lines = [_line(rng, bad) for _ in range(rng.randrange(1, 5))]
        data = (b"\r\n" if rng.random() < 0.1 else b"\n").join(lines)
        if rng.random() < 0.8:
            data += b"\n"
        fast = read_lines(data, READ_SCHEMA_LENGTHS)
        ref, n_lines, refused = _msgspec_reading(data, monkeypatch)
        if fast is None:
            declined += 1
            continue
        accepted += 1
        assert not refused, (data, refused)
        assert n_lines == fast.num_rows == ref.num_rows, data
        _assert_same(fast, ref)
    # A reader that declined everything would pass the comparison above: it must have taken a
    # share of these blocks (the odd values above make most decline), and takes plain ones
    # (the tests below).
    assert accepted > 50


VALID_LINES = [
    b'{"rating":4.0,"asin":"B1","parent_asin":"P1","user_id":"U1","timestamp":1516543721231,'
    b'"helpful_vote":2,"verified_purchase":true,"text":"plain"}',
    b'{"rating":5,"parent_asin":"P1","user_id":"U1","timestamp":1}',  # an integer rating
    b'{"text":"\\u00e9\\ud83d\\ude00\\"\\\\\\n\xc3\xa9\xf0\x9f\x98\x80","rating":null}',
    b'{"parent_asin":"P1","parent_asin":"P2","text":"a","text":null}',  # the last value stands
    b'{"parent_asin":"P1","parent_asin":null,"asin":null,"asin":"A"}',
    b'{ "rating" : 3.5 ,\t"images" : [ {"u": [1, -2.5e3, true, null, {}], "v": []} ] }',
    b'{}',
    b'{"user_id":"\xe4\xb8\xad","helpful_vote":-0,"verified_purchase":false}\r',
    b'{"rating":-0.0,"timestamp":999999999999999999}',
]


@pytest.mark.parametrize("line", VALID_LINES)
def test_valid_lines_are_read_as_msgspec_reads_them(line: bytes,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = line + b"\n" + VALID_LINES[0]  # and the last line without its newline
    fast = read_lines(data, READ_SCHEMA_LENGTHS)
    assert fast is not None
    ref, n_lines, refused = _msgspec_reading(data, monkeypatch)
    assert not refused and n_lines == 2
    _assert_same(fast, ref)


DECLINED = [
    b'{"rating":"4"}', b'{"rating":true}', b'{"rating":1e400}', b'{"timestamp":1.0}',
    b'{"timestamp":9223372036854775808}', b'{"helpful_vote":"1"}', b'{"verified_purchase":1}',
    b'{"parent_asin":5}', b'{"parent_asin":"a\\"b"}', b'{"text":5}', b'{"text":"\\ud800"}',
    b'{"text":"\xff"}', b'{"text":"\xed\xa0\x80"}', b'{"text":"\xc0\xaf"}', b'{"text":"a\x01"}',
    b'{"title":"\xe2\x82"}', b'{"images":[1,]}', b'{"images":[01]}', b'{"rating":4,}',
    b'{"rating":4} {"rating":5}', b' {"rating":4}', b'{"rating":4} ', b'', b'null', b'[]',
    b'{"rating":4', b'{"r\\u0061ting":4}', b'{"a":' + b"[" * 70 + b"]" * 70 + b"}",
    b'{"rating":4}\r\r', b'{"a":nul}', b'{"a":"x"\n}',
]


@pytest.mark.parametrize("line", DECLINED)
def test_lines_it_cannot_read_without_doubt_decline_the_block(line: bytes) -> None:
    assert read_lines(VALID_LINES[0] + b"\n" + line + b"\n", READ_SCHEMA_LENGTHS) is None


def test_a_null_id_takes_no_bytes() -> None:
    table = read_lines(b'{"parent_asin":"P1","parent_asin":null}\n{"parent_asin":"P2"}\n',
                       READ_SCHEMA_LENGTHS)
    assert table is not None
    column = table.column("parent_asin").chunk(0)
    assert column.to_pylist() == [None, "P2"]
    assert np.frombuffer(column.buffers()[1], np.int32)[:3].tolist() == [0, 0, 2]
    assert column.buffers()[2].to_pybytes()[:2] == b"P2"


def test_ids_copied_while_parsing_land_in_their_rows() -> None:
    rng = random.Random(3)
    rows = [{"parent_asin": "P" * rng.randrange(0, 40), "asin": None if i % 3 else f"A{i}",
             "user_id": "U" + "x" * rng.randrange(0, 30), "rating": 4.0, "timestamp": i}
            for i in range(500)]
    table = read_lines("\n".join(json.dumps(r) for r in rows).encode(), READ_SCHEMA_LENGTHS)
    assert table is not None
    for name in ("parent_asin", "asin", "user_id"):
        assert table.column(name).to_pylist() == [r[name] for r in rows]


def test_ingest_output_is_the_same_with_and_without_it(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    lines = [json.dumps({"rating": rng.choice([1.0, 2.5, 5]), "title": "t",
                         "text": "é" * rng.randrange(30), "images": [{"u": "x"}],
                         "asin": f"A{i % 50}", "parent_asin": f"P{i % 40}",
                         "user_id": f"U{i % 300}", "timestamp": 1_600_000_000_000 + i * 3_600_000,
                         "helpful_vote": i % 4, "verified_purchase": i % 2 == 0})
             for i in range(3000)]
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("\n".join(lines) + "\n")
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps({"parent_asin": f"P{p}", "title": "x",
                                        "main_category": "c"}) + "\n" for p in range(40)))
    calls: list[bool] = []

    def counting(piece: bytes | memoryview, schema: pa.Schema) -> pa.Table | None:
        table = read_lines(piece, schema)
        calls.append(table is not None)
        return table

    outputs = []
    for name, reader in (("fast", counting), ("msgspec", lambda piece, schema: None)):
        with monkeypatch.context() as m:
            m.setattr(fastjson, "read_lines", reader)
            ingest([reviews], meta, tmp_path / name, IngestConfig())
        outputs.append(pa.dataset.dataset(tmp_path / name / "reviews").to_table()
                       .sort_by([("parent_asin", "ascending"), ("timestamp", "ascending")]))
    assert calls and all(calls)  # the fast run did read every block with fastjson
    assert outputs[0].equals(outputs[1])
