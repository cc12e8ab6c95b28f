"""A review's text length counted on its raw JSON (hpcpipe/steps/ingest/jsontext.py) equals the
length of the decoded string: escapes, surrogate pairs, raw UTF-8, runs of backslashes; what is
not a string or not UTF-8 is refused, and through ingest such a line is quarantined by reason."""

from __future__ import annotations

import json
import random
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcpipe.config import IngestConfig
from hpcpipe.steps.ingest import ingest
from hpcpipe.steps.ingest.jsontext import NotText, string_lengths


class _Text(msgspec.Struct):
    text: msgspec.Raw = msgspec.Raw(b"null")


_DECODE = msgspec.json.Decoder(_Text)
#: Pieces of text that JSON writes escaped or as several bytes: quotes, backslashes (runs of
#: them next to a ``u``), control characters, two- to four-byte UTF-8, U+2028.
_PIECES = ["a", " ", '"', "\\", "\\\\u", "\n", "\t", "\x01", "\x7f", "é", "€", "😀", "\u2028",
           "/", "u", "d8", "\\ud800"]


def _raws(lines: list[bytes]) -> list[msgspec.Raw]:
    return [_DECODE.decode(line).text for line in lines]


def test_lengths_equal_the_decoded_strings_on_random_texts() -> None:
    rng = random.Random(7)
    for _ in range(600):
        texts: list[str | None] = [
            None if rng.random() < 0.1 else
            "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 14)))
            for _ in range(rng.randint(1, 40))]
        # Escaped (\\u00e9, \\ud83d\\ude00) or raw UTF-8, line by line; a key left out is null.
        lines = [b"{}" if t is None and rng.random() < 0.5 else
                 json.dumps({"text": t}, ensure_ascii=rng.random() < 0.5).encode()
                 for t in texts]
        assert string_lengths(_raws(lines)).to_pylist() == [
            None if t is None else len(t) for t in texts]


def test_a_block_of_plain_ascii_and_an_empty_block() -> None:
    assert string_lengths(_raws([b'{"text":""}', b'{"text":"abc"}'])).to_pylist() == [0, 3]
    assert string_lengths([]).to_pylist() == []


@pytest.mark.parametrize("raw", [b"5", b"true", b"[\"a\"]", b"{\"a\": \"b\"}",
                                 b'"\xff"', b'"\xc0\xaf"', b'"\xed\xa0\x80"', b'"\xe2\x82"'])
def test_not_a_string_or_not_utf8_is_refused(raw: bytes) -> None:
    """Other JSON types; bytes that are not UTF-8 (an invalid byte, an overlong form, an encoded
    surrogate, a cut sequence), which the JSON check of a value does not look at."""
    with pytest.raises(NotText):
        string_lengths(_raws([b'{"text":"fine"}', b'{"text":' + raw + b"}"]))


def test_through_ingest_text_lengths_and_refusals_match_the_decoded_text(tmp_path: Path) -> None:
    """Raw UTF-8 and escaped text in one file, read with and without the words: the same
    lengths, the length of each text; a text that is not a string is quarantined by reason."""
    rng = random.Random(3)
    texts = ["".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    lines = [json.dumps({"rating": 4.0, "text": t, "parent_asin": f"P{i % 5}",
                         "user_id": f"U{i}", "timestamp": 1_600_000_000_000 + i},
                        ensure_ascii=i % 2 == 0) for i, t in enumerate(texts)]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # In a file of its own: a refused line sends its whole block down the line-by-line path.
    (tmp_path / "bad.jsonl").write_text('{"rating": 4.0, "text": 12, "parent_asin": "P1", '
                                        '"user_id": "X", "timestamp": 1600000000000}\n')
    (tmp_path / "m.jsonl").write_text("".join(
        json.dumps({"parent_asin": f"P{i}", "title": "t"}) + "\n" for i in range(5)))
    got = {}
    for keep in (False, True):
        out = tmp_path / f"out-{keep}"
        m = ingest([tmp_path / "r.jsonl", tmp_path / "bad.jsonl"], tmp_path / "m.jsonl", out,
                   IngestConfig(target_bucket_rows=100, keep_text=keep))
        assert (m["rows_out"], m["quarantined"]) == (300, 1)
        assert m["reasons"] == {"text is not a string": 1}
        table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("reviews/*/*.parquet")))
        got[keep] = dict(zip(table.column("user_id").to_pylist(),
                             table.column("text_chars").to_pylist(), strict=True))
    assert got[False] == got[True] == {f"U{i}": len(t) for i, t in enumerate(texts)}
