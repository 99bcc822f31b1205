import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE

from granite_ray import storage
from granite_ray.config import DataConfig
from granite_ray.data.corpus import read_corpus
from granite_ray.tokenizer import load_tokenizer, save_tokenizer

MALFORMED_JSONL = (
    b'{"_id": "good-1", "title": "A title", "text": "body one"}\n'
    b'{"_id": "bad-json", "text": \n'                    # bad JSON
    b'{"_id": "empty", "title": "", "text": "   "}\n'     # empty text
    b'{"_id": "wrong-type", "text": 42}\n'               # wrong type
    b'["not", "an", "object"]\n'                        # wrong type
    b'{"_id": "bad-utf8", "text": "caf\xe9"}\n'          # invalid UTF-8
    b'\n'                                               # blank lines are not rows
    b'{"title": "only a title"}\n'                      # good, id from source:line
)


def _write_corpus(root_uri: str) -> int:
    """adi corpus as jsonl + a malformed jsonl + two parquet files (one all wrong-typed); returns good rows."""
    adi = (SAMPLE / "adi.jsonl").read_bytes()
    storage.write_bytes(storage.join(root_uri, "part-0.jsonl"), adi)
    storage.write_bytes(storage.join(root_uri, "part-1.jsonl"), MALFORMED_JSONL)
    good = pa.table({"_id": ["p1", "p2", "p3", "p4"], "title": ["t1", None, "", "t4"], "text": ["x", "y", None, ""]})
    bad = pa.table({"_id": ["q1", "q2"], "text": [1, 2]})
    for name, table in (("part-2.parquet", good), ("part-3.parquet", bad)):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(storage.join(root_uri, name), sink.getvalue().to_pybytes())
    return len(adi.splitlines()) + 2 + 3


@pytest.mark.parametrize("where", ["local", "s3"])
def test_jsonl_and_parquet_stream_with_malformed_rows_dropped_and_counted(ray_local, tmp_path, bucket, where):
    root = str(tmp_path / "corpus") if where == "local" else f"s3://{bucket}/corpus"
    expected_good = _write_corpus(root)
    ds, counter = read_corpus(DataConfig(paths=[root], text_fields=["title", "text"]))
    rows = list(ds.iter_rows())
    ids = {r["id"] for r in rows}
    assert len(rows) == expected_good
    assert {"good-1", "p1", "p2", "p4"} <= ids and not ids & {"p3", "q1", "q2", "empty", "wrong-type"}
    assert any(i.endswith("part-1.jsonl:8") for i in ids)  # id falls back to file:line
    assert ray_local.get(counter.totals.remote()) == {
        "bad_json": 1, "empty_text": 2, "wrong_type": 4, "invalid_utf8": 1}
    by_id = {r["id"]: r["text"] for r in rows}
    assert by_id["good-1"] == "A title\nbody one"


def test_missing_corpus_fails_clearly(ray_local, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_corpus(DataConfig(paths=[str(tmp_path / "nope")]))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no .jsonl or .parquet"):
        read_corpus(DataConfig(paths=[str(tmp_path)]))


def test_tokenizer_round_trip_through_s3(s3, bucket, tokenizer):
    uri = f"s3://{bucket}/tokenizer"
    save_tokenizer(tokenizer, uri)
    loaded = load_tokenizer(uri)
    text = "the pressure distribution on a slender body of revolution"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded(text)["input_ids"][0] == loaded.cls_token_id and loaded.mask_token == "[MASK]"
    assert json.loads(storage.read_bytes(f"{uri}/tokenizer.json"))["model"]["type"] == "BPE"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_head_records_reads_the_first_records_of_jsonl_and_parquet(tmp_path, bucket, where):
    from granite_ray.data.corpus import head_records

    root = str(tmp_path) if where == "local" else f"s3://{bucket}/head"
    _write_corpus(root)
    adi = [json.loads(line) for line in (SAMPLE / "adi.jsonl").read_text().splitlines()]
    assert head_records(storage.join(root, "part-0.jsonl"), 3) == adi[:3]
    assert [r["_id"] for r in head_records(storage.join(root, "part-2.parquet"), 10)] == ["p1", "p2", "p3", "p4"]
    with pytest.raises(ValueError, match=r"part-1.jsonl:2: not JSON"):
        head_records(storage.join(root, "part-1.jsonl"), 5)


def test_rows_a_later_step_must_cover_whole_fail_on_the_first_bad_line_with_its_file_and_line():
    """Without a drop counter (teacher inputs, evaluation corpora) the one parser stops at a bad row."""
    import numpy as np

    from granite_ray.data.pairs import scoring_rows
    from granite_ray.data.rows import RowError
    from granite_ray.evaluate.beir import DatasetError, _documents

    def batch(*lines: bytes) -> dict:
        return {"line": np.array(lines, dtype=object), "source": np.array(["rows.jsonl"] * len(lines), dtype=object),
                "lineno": np.arange(1, len(lines) + 1)}

    good = b'{"query": "q", "pos": ["p"], "neg": ["n1", "n2"]}'
    assert scoring_rows(batch(good))["neg"][0] == ["n1", "n2"]
    with pytest.raises(RowError, match=r"^rows.jsonl:2: bad_json$"):
        scoring_rows(batch(good, b"{not json"))
    with pytest.raises(RowError, match=r"^rows.jsonl:2: invalid_utf8$"):
        scoring_rows(batch(good, b'{"query": "\xff"}'))
    with pytest.raises(RowError, match=r"^rows.jsonl:1: a row needs query \(string\), pos and neg"):
        scoring_rows(batch(b'{"query": 3, "pos": []}'))
    with pytest.raises(DatasetError, match=r"^rows.jsonl:1: a corpus document needs an _id$"):
        _documents(batch(b'{"text": "no id"}'))
