"""Stream a text corpus (jsonl/parquet files, local or s3://) into rows {id, text}.

Malformed rows (bad JSON, invalid UTF-8, wrong types, missing or empty text) are dropped and
counted by reason in a `DropCounter` actor, so a run can report what it skipped. Files are
read in bounded chunks: memory does not grow with file or corpus size.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource

from granite_ray import storage
from granite_ray.config import DataConfig

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
READ_CHUNK_BYTES = 8 << 20
LINES_PER_BLOCK = 4096


@ray.remote(num_cpus=0)
class DropCounter:
    """Totals of dropped rows by reason, fed by every normalize task."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def totals(self) -> dict[str, int]:
        return dict(self.counts)


class JsonlLinesDatasource(FileBasedDatasource):
    """Raw lines of jsonl files, read in fixed-size chunks; parsing happens downstream."""

    _FILE_EXTENSIONS = ["jsonl", "json", "ndjson"]

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        carry = b""
        lineno = 0
        lines: list[bytes] = []
        numbers: list[int] = []

        def flush() -> pa.Table:
            table = pa.table({
                "line": pa.array(lines, type=pa.binary()),
                "source": pa.array([path] * len(lines), type=pa.string()),
                "lineno": pa.array(numbers, type=pa.int64()),
            })
            lines.clear()
            numbers.clear()
            return table

        while True:
            chunk = f.read(READ_CHUNK_BYTES)
            if not chunk:
                break
            parts = (carry + chunk).split(b"\n")
            carry = parts.pop()
            for part in parts:
                lineno += 1
                if part.strip():
                    lines.append(part)
                    numbers.append(lineno)
            if len(lines) >= LINES_PER_BLOCK:
                yield flush()
        if carry.strip():
            lines.append(carry)
            numbers.append(lineno + 1)
        if lines:
            yield flush()


def normalize_record(record: Any, text_fields: list[str], id_field: str, fallback_id: str) -> tuple[str, str] | str:
    """(id, text) for a good record, else the reason it is dropped."""
    if not isinstance(record, dict):
        return "wrong_type"
    pieces = []
    for field in text_fields:
        value = record.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            return "wrong_type"
        value = value.strip()
        if value:
            pieces.append(value)
    if not pieces:
        return "empty_text"
    doc_id = record.get(id_field)
    if doc_id is None or (isinstance(doc_id, float) and np.isnan(doc_id)):
        doc_id = fallback_id
    elif not isinstance(doc_id, (str, int, np.integer)):
        return "wrong_type"
    return str(doc_id), "\n".join(pieces)


def _finish(ids: list[str], texts: list[str], dropped: Counter, counter) -> dict[str, np.ndarray]:
    if dropped:
        ray.get(counter.add.remote(dict(dropped)))  # counted before the batch moves on
    return {"id": np.array(ids, dtype=object), "text": np.array(texts, dtype=object)}


def normalize_jsonl(batch: dict[str, np.ndarray], text_fields: list[str], id_field: str, counter) -> dict[str, np.ndarray]:
    ids: list[str] = []
    texts: list[str] = []
    dropped: Counter = Counter()
    for line, source, lineno in zip(batch["line"], batch["source"], batch["lineno"]):
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            dropped["invalid_utf8"] += 1
            continue
        except json.JSONDecodeError:
            dropped["bad_json"] += 1
            continue
        _take(normalize_record(record, text_fields, id_field, f"{source}:{lineno}"), ids, texts, dropped)
    return _finish(ids, texts, dropped, counter)


def normalize_records(batch: dict[str, np.ndarray], text_fields: list[str], id_field: str, counter) -> dict[str, np.ndarray]:
    ids: list[str] = []
    texts: list[str] = []
    dropped: Counter = Counter()
    columns = list(batch)
    for i in range(len(batch[columns[0]]) if columns else 0):
        record = {c: _plain(batch[c][i]) for c in columns}
        fallback = f"{record.pop('__source', 'row')}:{i}"
        _take(normalize_record(record, text_fields, id_field, fallback), ids, texts, dropped)
    return _finish(ids, texts, dropped, counter)


def _take(result: tuple[str, str] | str, ids: list, texts: list, dropped: Counter) -> None:
    if isinstance(result, str):
        dropped[result] += 1
    else:
        ids.append(result[0])
        texts.append(result[1])


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def resolve_files(config: DataConfig) -> tuple[list[str], list[str]]:
    """(jsonl files, parquet files) named by the config's paths, directories and globs."""
    if not config.paths:
        raise ValueError("data.paths: no corpus given")
    jsonl, parquet = [], []
    for path in config.paths:
        files = storage.list_files(path)
        for f in files:
            fmt = config.format
            if fmt == "auto":
                fmt = "jsonl" if f.endswith(JSONL_SUFFIXES) else "parquet" if f.endswith(PARQUET_SUFFIXES) else None
            if fmt == "jsonl":
                jsonl.append(f)
            elif fmt == "parquet":
                parquet.append(f)
    if not jsonl and not parquet:
        raise ValueError(f"data.paths: no .jsonl or .parquet files under {config.paths}")
    return jsonl, parquet


def read_corpus(config: DataConfig, counter=None) -> tuple[ray.data.Dataset, Any]:
    """A lazily streamed Dataset of {id, text} and the DropCounter collecting its drop counts."""
    counter = counter or DropCounter.remote()
    jsonl, parquet = resolve_files(config)
    parts = []
    cpu = {"num_cpus": 0.25}
    fn_kwargs = {"text_fields": config.text_fields, "id_field": config.id_field, "counter": counter}
    if jsonl:
        fs, _ = storage.resolve(jsonl[0])
        paths = [storage.resolve(p)[1] for p in jsonl]
        lines = ray.data.read_datasource(JsonlLinesDatasource(paths, filesystem=fs), ray_remote_args=cpu)
        parts.append(lines.map_batches(normalize_jsonl, fn_kwargs=fn_kwargs, batch_size=LINES_PER_BLOCK, **cpu))
    if parquet:
        fs, _ = storage.resolve(parquet[0])
        paths = [storage.resolve(p)[1] for p in parquet]
        wanted = list(dict.fromkeys([*config.text_fields, config.id_field]))
        table = ray.data.read_parquet(paths, filesystem=fs, ray_remote_args=cpu, include_paths=True)
        table = table.rename_columns({"path": "__source"}) if "path" not in wanted else table
        parts.append(table.map_batches(normalize_records, fn_kwargs=fn_kwargs, batch_size=LINES_PER_BLOCK,
                                       batch_format="numpy", **cpu))
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    if config.max_docs:
        ds = ds.limit(config.max_docs)
    return ds, counter
