"""Stream a text corpus (jsonl/parquet files, local or s3://) into rows {id, text}.

Malformed rows (bad JSON, invalid UTF-8, wrong types, missing or empty text) are dropped and
counted by reason in a `DropCounter` actor, so a run can report what it skipped. Files are
read in bounded chunks: memory does not grow with file or corpus size.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FileBasedDatasource

from granite_ray import storage
from granite_ray.config import DataConfig
from granite_ray.data.rows import RowError, parse_lines, text_columns

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
READ_CHUNK_BYTES = 8 << 20
LINES_PER_BLOCK = 4096
BYTES_PER_BLOCK = 8 << 20


@ray.remote(num_cpus=0)
class DropCounter:
    """Dropped rows by reason, fed by every normalize task. Rows are keyed by file and line, so
    a row met again (another epoch, another worker's pass) is counted once."""

    def __init__(self) -> None:
        self.rows: dict[str, set[str]] = {}

    def add(self, dropped: list[tuple[str, str]]) -> None:
        for reason, row in dropped:
            self.rows.setdefault(reason, set()).add(row)

    def totals(self) -> dict[str, int]:
        return {reason: len(rows) for reason, rows in sorted(self.rows.items())}

    def examples(self) -> dict[str, list[str]]:
        return {reason: sorted(rows) for reason, rows in sorted(self.rows.items())}


class RecordLinesDatasource(FileBasedDatasource):
    """Raw records as JSON lines: jsonl lines as they are, parquet rows re-encoded, in bounded blocks.

    Parsing and validation happen downstream, so both formats share one normalize step, and
    parquet files whose schemas disagree never have to be merged.
    """

    def _open_input_source(self, filesystem, path: str, **open_args):
        if path.endswith(PARQUET_SUFFIXES):
            return filesystem.open_input_file(path)  # parquet needs random access (ranged GETs on S3)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        if path.endswith(PARQUET_SUFFIXES):
            yield from self._parquet_lines(f, path)
        else:
            yield from self._jsonl_lines(f, path)

    @staticmethod
    def _block(lines: list[bytes], numbers: list[int], path: str) -> pa.Table:
        return pa.table({
            "line": pa.array(lines, type=pa.binary()),
            "source": pa.array([path] * len(lines), type=pa.string()),
            "lineno": pa.array(numbers, type=pa.int64()),
        })

    @classmethod
    def _jsonl_lines(cls, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        carry = b""
        lineno = 0
        lines: list[bytes] = []
        numbers: list[int] = []
        size = 0
        while chunk := f.read(READ_CHUNK_BYTES):
            parts = (carry + chunk).split(b"\n")
            carry = parts.pop()
            for part in parts:
                lineno += 1
                if part.strip():
                    lines.append(part)
                    numbers.append(lineno)
                    size += len(part)
                if len(lines) >= LINES_PER_BLOCK or size >= BYTES_PER_BLOCK:
                    yield cls._block(lines, numbers, path)
                    lines, numbers, size = [], [], 0
        if carry.strip():
            lines.append(carry)
            numbers.append(lineno + 1)
        if lines:
            yield cls._block(lines, numbers, path)

    @classmethod
    def _parquet_lines(cls, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        row = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=LINES_PER_BLOCK):
            records = batch.to_pylist()
            lines = [json.dumps(r, default=str, ensure_ascii=False).encode() for r in records]
            yield cls._block(lines, list(range(row + 1, row + 1 + len(lines))), path)
            row += len(lines)


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


def normalize_lines(batch: dict[str, np.ndarray], text_fields: list[str], id_field: str, counter) -> dict[str, np.ndarray]:
    def normalized(record, where: str) -> tuple[str, str]:
        result = normalize_record(record, text_fields, id_field, where)
        if isinstance(result, str):
            raise RowError(result)
        return result

    rows = parse_lines(batch, normalized, counter)
    return text_columns(rows, ("id", "text"))


def head_records(uri: str, count: int) -> list[dict]:
    """The first `count` JSON records of one jsonl/parquet file (local or s3://), reading no further than
    they need: sample rows, e.g. to calibrate a new model head before training."""
    fs, path = storage.resolve(uri)
    parquet = path.endswith(PARQUET_SUFFIXES)
    records: list[dict] = []
    with (fs.open_input_file(path) if parquet else fs.open_input_stream(path)) as f:
        for block in (RecordLinesDatasource._parquet_lines if parquet else RecordLinesDatasource._jsonl_lines)(f, path):
            for line, number in zip(block["line"].to_pylist(), block["lineno"].to_pylist()):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{uri}:{number}: not JSON ({err})") from None
                if len(records) == count:
                    return records
    return records


def iter_record_lines(files: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """The datasource's blocks {line, source, lineno}, read in this process (no Ray Data), one at a time."""
    for uri in files:
        fs, path = storage.resolve(uri)
        is_parquet = path.endswith(PARQUET_SUFFIXES)
        with (fs.open_input_file(path) if is_parquet else fs.open_input_stream(path, compression="detect")) as f:
            blocks = RecordLinesDatasource._parquet_lines(f, path) if is_parquet else RecordLinesDatasource._jsonl_lines(f, path)
            for block in blocks:
                yield {name: block.column(name).to_numpy(zero_copy_only=False) for name in block.column_names}


def resolve_files(paths: list[str], fmt: str = "auto", field: str = "data.paths") -> list[str]:
    """The .jsonl/.parquet files named by paths, directories and globs (`field` names them in errors)."""
    if not paths:
        raise ValueError(f"{field}: no input given")
    suffixes = {"auto": JSONL_SUFFIXES + PARQUET_SUFFIXES, "jsonl": JSONL_SUFFIXES, "parquet": PARQUET_SUFFIXES}[fmt]
    files = [f for path in paths for f in storage.list_files(path, suffixes)]
    if not files:
        raise ValueError(f"{field}: no .jsonl or .parquet files under {paths}")
    if len({storage.is_s3(f) for f in files}) > 1:
        raise ValueError(f"{field}: mix of local and s3:// files; use one kind per dataset")
    return files


def read_record_lines(files: list[str], read_tasks: int | None = None) -> ray.data.Dataset:
    """Raw records {line, source, lineno} of local or s3:// jsonl/parquet files, streamed in bounded blocks."""
    fs, _ = storage.resolve(files[0])
    return ray.data.read_datasource(RecordLinesDatasource([storage.bare_path(f) for f in files], filesystem=fs),
                                    num_cpus=0.25, concurrency=read_tasks)


def read_corpus(config: DataConfig, counter=None) -> tuple[ray.data.Dataset, Any]:
    """A lazily streamed Dataset of {id, text} and the DropCounter collecting its drop counts."""
    counter = counter or DropCounter.remote()
    lines = read_record_lines(resolve_files(config.paths, config.format), config.read_tasks)
    # batch_size=None: one call per read block, so when Ray fuses this step into the tokenizer's
    # actor the bundles stay the tokenizer's batch size rather than growing to whole files.
    ds = lines.map_batches(normalize_lines, batch_size=None, num_cpus=0.25, fn_kwargs={
        "text_fields": config.text_fields, "id_field": config.id_field, "counter": counter})
    if config.max_docs:
        ds = ds.limit(config.max_docs)
    return ds, counter


def object_column(values: list) -> np.ndarray:
    """A 1-D object array of lists (numpy would turn equal-length lists into a 2-D array)."""
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column

