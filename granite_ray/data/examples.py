"""RetroMAE's examples, made where Ray Data runs: {enc_text or cells[, dec_text]} rows become
{enc, dec} framed token ids, and a table's tokens also their rows and columns. Imports neither torch
nor transformers, so its workers start in seconds."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from granite_ray.data.corpus import object_column
from granite_ray.data.rows import RowError, parse_lines, text_columns
from granite_ray.data.tables import Table, from_cells

GLOBAL = -1  # the row and column of the tokens every table token attends to: [CLS], the [SEP]s


def table_tokens(tokenizer: Tokenizer, table: Table, separator: int) -> tuple[list[int], list[int], list[int]]:
    """A table's content tokens as R2 linearizes it, "headers [SEP] cells" (the headers, then every
    non-empty cell row by row, space-separated), with each token's row and column (headers are row 0,
    the separator GLOBAL): what the M1 mask reads. Each header and cell is tokenized with the space
    before it, so the ids are those of the headers' text and of the cells' text, each tokenized whole."""
    headers = [(0, c, h) for c, h in enumerate(table.headers) if h]
    cells = [(r, c, cell) for r, row in enumerate(table.rows, 1) for c, cell in enumerate(row) if cell]
    texts = [text if i == 0 else f" {text}" for i, (_, _, text) in enumerate(headers + cells)]
    encoded = [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)] if texts else []
    spans = [(piece, r, c) for piece, (r, c, _) in zip(encoded, headers + cells)]
    spans.insert(len(headers), ([separator], GLOBAL, GLOBAL))
    ids = [token for piece, _, _ in spans for token in piece]
    rows = [r for piece, r, _ in spans for _ in piece]
    cols = [c for piece, _, c in spans for _ in piece]
    return ids, rows, cols


class TokenizeExamples:
    """Ray Data actor: {enc_text[, dec_text]} rows -> {enc, dec} framed token ids; {cells[, dec_text]}
    rows (tables as `Table.cells` JSON) -> {enc, dec, enc_rows, enc_cols}, each token's table row and
    column. Tables need the tokenizer's `separator` id.

    `windows=True` cuts a long encoder text into consecutive windows, one example each."""

    def __init__(self, tokenizer_json: str, frame: tuple[list[int], list[int]], max_len: int, windows: bool,
                 separator: int | None = None) -> None:
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.prefix, self.suffix = frame
        self.room = max_len - len(self.prefix) - len(self.suffix)
        self.windows = windows
        self.separator = separator

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "cells" in batch:
            return self._tables(batch)
        encoded = self._ids(list(batch["enc_text"]))
        targets = self._ids(list(batch["dec_text"])) if "dec_text" in batch else [[] for _ in encoded]
        enc, dec = [], []
        for content, target in zip(encoded, targets):
            pieces = [content[s:s + self.room] for s in range(0, len(content), self.room)] if self.windows else [content[:self.room]]
            for piece in pieces:
                if len(piece) < 2:
                    continue
                enc.append(np.array(self.prefix + piece + self.suffix, dtype=np.int32))
                dec.append(np.array(self.prefix + target[:self.room] + self.suffix if target else [], dtype=np.int32))
        return {"enc": object_column(enc), "dec": object_column(dec)}

    def _tables(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One example per table, cut to max_len; its frame tokens are GLOBAL."""
        if self.separator is None:
            raise ValueError("TokenizeExamples: tables need the tokenizer's separator id")
        targets = self._ids(list(batch["dec_text"])) if "dec_text" in batch else [[] for _ in batch["cells"]]
        columns = {"enc": [], "dec": [], "enc_rows": [], "enc_cols": []}
        frame = ([GLOBAL] * len(self.prefix), [GLOBAL] * len(self.suffix))
        for cells, target in zip(batch["cells"], targets):
            ids, rows, cols = (part[:self.room] for part in table_tokens(self.tokenizer, from_cells(cells), self.separator))
            columns["enc"].append(np.array(self.prefix + ids + self.suffix, dtype=np.int32))
            columns["dec"].append(np.array(self.prefix + target[:self.room] + self.suffix if target else [], dtype=np.int32))
            columns["enc_rows"].append(np.array(frame[0] + rows + frame[1], dtype=np.int32))
            columns["enc_cols"].append(np.array(frame[0] + cols + frame[1], dtype=np.int32))
        return {name: object_column(values) for name, values in columns.items()}


def _summary_row(record, where: str) -> tuple[str, str]:
    if not isinstance(record, dict) or not isinstance(record.get("cells"), str) or not isinstance(record.get("summary"), str):
        raise RowError("a summarize-tables row needs cells (the table as JSON) and summary (strings)")
    return record["cells"], record["summary"]


def summary_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """summarize-tables parquet rows -> the table's cells and its summary; a malformed row fails the job."""
    rows = parse_lines(batch, _summary_row)
    return text_columns(rows, ("cells", "dec_text"))
