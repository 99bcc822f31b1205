"""Tables from Markdown, HTML, CSV or lists of rows, normalized to headers + rows.

A table travels as Markdown (for an LLM's prompt) and as `cells`, the JSON list [headers, *rows],
which keeps its structure exactly for the encoder (granite_ray.data.examples.table_tokens). A
table that cannot be read raises TableError naming the reason.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from html.parser import HTMLParser

import numpy as np
import ray

from granite_ray.config import TablesConfig
from granite_ray.data.corpus import read_record_lines, resolve_files
from granite_ray.data.rows import RowError, parse_lines

BAD_TABLE = "bad_table"  # the reason unreadable tables are counted under


class TableError(ValueError):
    """A table is empty, ragged beyond repair, or not in a format we read."""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

    def cells(self) -> str:
        """[headers, *rows] as JSON: read back with `from_cells`, unlike Markdown, whatever the cells hold."""
        return json.dumps([self.headers, *self.rows], ensure_ascii=False)


def from_cells(text: str) -> Table:
    headers, *rows = json.loads(text)
    return Table(headers, rows)


def _normalized(rows: list[list], source: str) -> Table:
    rows = [[("" if c is None else str(c)).strip() for c in row] for row in rows if row is not None]
    rows = [row for row in rows if any(row)]
    if len(rows) < 2:
        raise TableError(f"{source} table needs a header row and at least one data row, got {len(rows)} row(s)")
    headers, body = rows[0], rows[1:]
    width = len(headers)
    if not any(headers):
        raise TableError(f"{source} table has an empty header row")
    for i, row in enumerate(body, 2):
        if len(row) > width and any(row[width:]):
            raise TableError(f"{source} table row {i} has {len(row)} cells for {width} headers")
    return Table(headers, [(row + [""] * width)[:width] for row in body])


def from_markdown(text: str) -> Table:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines or not all(line.startswith("|") for line in lines):
        raise TableError("markdown table lines must start with '|'")
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if all(set(c) <= set("-: ") and c for c in cells):
            continue  # the |---|---| rule
        rows.append(cells)
    return _normalized(rows, "markdown")


class _HTMLTable(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables += 1
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            if not self.rows:
                self.rows.append([])
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def from_html(text: str) -> Table:
    parser = _HTMLTable()
    parser.feed(text)
    if parser.tables == 0:
        raise TableError("html has no <table>")
    return _normalized(parser.rows, "html")


def from_csv(text: str) -> Table:
    try:
        rows = list(csv.reader(io.StringIO(text.strip())))
    except csv.Error as err:
        raise TableError(f"csv: {err}") from None
    return _normalized(rows, "csv")


def parse_table(value, fmt: str = "auto") -> Table:
    """A table given as Markdown/HTML/CSV text, a list of rows (first = headers) or {headers, rows}."""
    if isinstance(value, dict):
        if not isinstance(value.get("headers"), list) or not isinstance(value.get("rows"), list):
            raise TableError("a table object needs 'headers' and 'rows' lists")
        return _normalized([value["headers"], *value["rows"]], "object")
    if isinstance(value, list):
        if not all(isinstance(row, list) for row in value):
            raise TableError("a list table must be a list of rows (lists)")
        return _normalized(value, "rows")
    if not isinstance(value, str) or not value.strip():
        raise TableError(f"no table text (got {type(value).__name__})")
    if fmt == "auto":
        stripped = value.lstrip()
        fmt = "markdown" if stripped.startswith("|") else "html" if stripped.lower().startswith("<") else "csv"
    readers = {"markdown": from_markdown, "html": from_html, "csv": from_csv}
    if fmt not in readers:
        raise TableError(f"unknown table format {fmt!r}")
    return readers[fmt](value)


def parse_table_rows(batch: dict[str, np.ndarray], config: dict, counter) -> dict[str, np.ndarray]:
    """JSON lines -> {id, title, table (Markdown), cells (JSON)}; unreadable tables reported and skipped."""
    cfg = TablesConfig(**config)

    def parsed(record, where: str) -> dict[str, str]:
        try:
            if not isinstance(record, dict):
                raise TableError("not a JSON object")
            table = parse_table(record.get(cfg.table_field), cfg.format)
        except TableError as err:
            raise RowError(BAD_TABLE, detail=str(err)) from None
        return {"id": str(record.get(cfg.id_field, where)), "title": str(record.get(cfg.title_field) or ""),
                "table": table.markdown(), "cells": table.cells()}

    rows = parse_lines(batch, parsed, counter)
    return {k: np.array([r[k] for r in rows], dtype=object) for k in ("id", "title", "table", "cells")}


def read_tables(config: TablesConfig, counter) -> ray.data.Dataset:
    ds = read_record_lines(resolve_files(config.paths, field="tables.paths")).map_batches(parse_table_rows, batch_size=None, num_cpus=0.25,
                                          fn_kwargs={"config": config.model_dump(), "counter": counter})
    return ds.limit(config.max_tables) if config.max_tables else ds

