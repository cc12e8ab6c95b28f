"""hpcpipe.run.provenance: which steps are out of date, from the small JSON records only (what
`hpcpipe status` and `summarize` read), and what changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcpipe.run import provenance
from hpcpipe.run.layout import RunLayout


def _records(root: Path, ingest: dict | None, features: dict | None) -> RunLayout:
    layout = RunLayout(root)
    for folder, record in ((layout.ingest, ingest), (layout.features, features)):
        folder.mkdir(parents=True, exist_ok=True)
        if record is not None:
            (folder / "manifest.json").write_text(json.dumps(record))
    return layout


def _made(made_from: dict) -> dict:
    return {"made_from": made_from, "fingerprint": provenance.fingerprint(made_from)}


@pytest.mark.parametrize(("case", "want"), [
    ("current", {}),
    ("ingest_again", {"features": "out of date: ingest ran again since"}),
    ("ingest_gone", {"features": "out of date: ingest's output is gone or being rebuilt"}),
    ("old_record", {"features": "inputs not recorded (older hpcpipe): recomputed when rerun"}),
])
def test_out_of_date_steps_from_the_records(tmp_path: Path, case: str, want: dict) -> None:
    source = tmp_path / "r.jsonl"
    source.write_text("{}\n")
    st = source.stat()
    ingest = _made({"inputs": [{"role": "reviews", "path": str(source), "bytes": st.st_size,
                                "mtime_ns": st.st_mtime_ns, "sample": "x"}],
                    "settings": {"target_bucket_rows": 5}})
    features = _made({"ingest": ingest["fingerprint"], "last_week": "2020-01-06",
                      "settings": {}})
    if case == "ingest_again":
        ingest = _made({**ingest["made_from"], "settings": {"target_bucket_rows": 6}})
    layout = _records(tmp_path / "run", None if case == "ingest_gone" else ingest,
                      {"n_buckets": 1} if case == "old_record" else features)
    assert provenance.out_of_date(layout) == want


def test_an_input_file_changed_since_ingest_ran_marks_ingest(tmp_path: Path) -> None:
    source = tmp_path / "r.jsonl"
    source.write_text("{}\n")
    st = source.stat()
    ingest = _made({"inputs": [{"role": "reviews", "path": str(source), "bytes": st.st_size,
                                "mtime_ns": st.st_mtime_ns, "sample": "x"}], "settings": {}})
    features = _made({"ingest": ingest["fingerprint"], "last_week": "2020-01-06",
                      "settings": {}})
    layout = _records(tmp_path / "run", ingest, features)
    assert provenance.out_of_date(layout) == {}
    source.write_text("{}\n{}\n")
    assert provenance.out_of_date(layout) == {
        "ingest": "out of date: input r.jsonl changed since",
        "features": "out of date: ingest is out of date"}
