"""BEIR-format datasets (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), local or s3://.

Queries and qrels are small and read whole; the corpus is streamed by Ray Data. Documents are
"title text" joined as mteb joins them, so scores match mteb's on the same folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import ray

from granite_ray import storage
from granite_ray.data.conversations import format_conversation
from granite_ray.data.corpus import iter_record_lines, read_record_lines
from granite_ray.data.rows import RowError, parse_lines, text_columns
from granite_ray.errors import UserError


class DatasetError(UserError, ValueError):
    """A BEIR folder is missing a file or its files disagree; the message says where."""


@dataclass
class BeirDataset:
    uri: str
    split: str
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def corpus_uri(self) -> str:
        return storage.join(self.uri, "corpus.jsonl")


def _require(uri: str, what: str) -> bytes:
    if not storage.exists(uri):
        raise DatasetError(f"{what} not found: {uri}")
    return storage.read_bytes(uri)


def read_jsonl(uri: str, what: str = "rows") -> list[dict]:
    """A whole JSON-lines file (queries, a corpus): a line that is not JSON fails with its file:line."""
    rows = []
    for number, line in enumerate(_require(uri, what).decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DatasetError(f"{uri}:{number}: not JSON ({err.msg})") from None
    return rows


def load_beir(uri: str, split: str = "test", query_format: str = "text") -> BeirDataset:
    """Queries and qrels of one split, checked against each other.

    `query_format="conversation"` makes each query from its `conversation` turns, most recent first."""
    if storage.exists(uri):
        storage.require_complete(uri)  # e.g. a split-queries output cut off mid-write
    qrels_uri = storage.join(uri, "qrels", f"{split}.tsv")
    if not storage.exists(qrels_uri):
        present = [f.rsplit("/", 1)[-1].removesuffix(".tsv") for f in storage.list_files(storage.join(uri, "qrels"))
                   if f.endswith(".tsv")] if storage.exists(storage.join(uri, "qrels")) else []
        raise DatasetError(f"qrels for split {split!r} not found: {qrels_uri} (splits present: {present or 'none'})")
    if not storage.exists(storage.join(uri, "corpus.jsonl")):
        raise DatasetError(f"corpus not found: {storage.join(uri, 'corpus.jsonl')}")
    queries_uri = storage.join(uri, "queries.jsonl")
    queries = {}
    for row in read_jsonl(queries_uri, "queries"):
        if "_id" not in row or not isinstance(row.get("text"), str):
            raise DatasetError(f"{queries_uri}: every query needs _id and text, got {sorted(row)}")
        if query_format == "conversation":
            turns = row.get("conversation")
            if not isinstance(turns, list) or not turns:
                raise DatasetError(f"{queries_uri}: query {row['_id']} has no conversation (a list of turns)")
            try:
                queries[str(row["_id"])] = format_conversation(turns)
            except RowError as err:
                raise DatasetError(f"{queries_uri}: query {row['_id']}: {err}") from None
        else:
            queries[str(row["_id"])] = row["text"]
    qrels: dict[str, dict[str, int]] = {}
    for number, line in enumerate(storage.read_bytes(qrels_uri).decode("utf-8").splitlines(), 1):
        fields = line.strip().split("\t")
        if not line.strip() or (number == 1 and fields[0] == "query-id"):
            continue
        if len(fields) != 3:
            raise DatasetError(f"{qrels_uri}:{number}: expected query-id, corpus-id, score separated by tabs")
        try:
            score = int(float(fields[2]))
        except ValueError:
            raise DatasetError(f"{qrels_uri}:{number}: score {fields[2]!r} is not a number") from None
        if fields[0] not in queries:
            raise DatasetError(f"{qrels_uri}:{number}: query {fields[0]!r} is not in {queries_uri}")
        qrels.setdefault(fields[0], {})[fields[1]] = score
    if not qrels:
        raise DatasetError(f"{qrels_uri}: no relevance judgements")
    return BeirDataset(uri, split, {q: queries[q] for q in qrels}, qrels)


def check_qrels_against_corpus(dataset: BeirDataset, doc_ids: set[str]) -> None:
    unknown = sorted({d for rel in dataset.qrels.values() for d in rel if d not in doc_ids})
    if unknown:
        raise DatasetError(f"{dataset.uri}/qrels/{dataset.split}.tsv names {len(unknown)} document(s) missing from "
                           f"{dataset.corpus_uri}: {', '.join(unknown[:5])}")


def document_text(row: dict) -> str:
    title, text = row.get("title") or "", row.get("text") or ""
    return (title + " " + text).strip() if title else text


def _document(record, where: str) -> tuple[str, str]:
    if not isinstance(record, dict) or "_id" not in record:
        raise RowError("a corpus document needs an _id")
    return str(record["_id"]), document_text(record)


def _documents(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Corpus lines -> {id, text}; a malformed document fails the evaluation with its file:line."""
    try:
        rows = parse_lines(batch, _document)
    except RowError as err:
        raise DatasetError(str(err)) from None
    return text_columns(rows, ("id", "text"))


def iter_documents(corpus_uri: str) -> Iterator[dict[str, np.ndarray]]:
    """A corpus .jsonl (local or s3://) as batches of {id, text} read in this process, parsed as
    `read_documents` parses them."""
    if not storage.exists(corpus_uri):
        raise DatasetError(f"corpus not found: {corpus_uri}")
    for block in iter_record_lines([corpus_uri]):
        yield _documents(block)


def read_documents(dataset: BeirDataset, read_tasks: int = 2) -> ray.data.Dataset:
    """A lazily streamed Dataset of {id, text}."""
    return read_record_lines([dataset.corpus_uri], read_tasks).map_batches(_documents, batch_size=None, num_cpus=0.25)

