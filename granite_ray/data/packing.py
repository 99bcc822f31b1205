"""Tokenize documents and pack them into fixed-length rows that keep document boundaries.

Every segment in a row is "[CLS] tokens [SEP]" and records its length, so attention can be
restricted to the segment (see granite_ray.models.attention). A document longer than the room left
in a row continues, as its own segment, in the next row: rows fill completely and only the
last row of each packed batch carries padding.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer


def pack_segments(
    token_lists: list[list[int]] | list[np.ndarray],
    doc_ids: list[str],
    max_len: int,
    cls_id: int,
    sep_id: int,
    pad_id: int,
    min_fragment: int = 8,
) -> dict[str, np.ndarray]:
    """Rows of `max_len` ids, each row's segment lengths, and the document id of each segment."""
    if max_len < min_fragment + 2:
        raise ValueError(f"max_len {max_len} leaves no room for a segment of {min_fragment} tokens")
    rows: list[np.ndarray] = []
    row_lens: list[np.ndarray] = []
    row_docs: list[list[str]] = []
    row = np.full(max_len, pad_id, dtype=np.int32)
    pos = 0
    lens: list[int] = []
    docs: list[str] = []

    def close_row() -> None:
        nonlocal row, pos, lens, docs
        rows.append(row)
        row_lens.append(np.array(lens, dtype=np.int32))
        row_docs.append(docs)
        row = np.full(max_len, pad_id, dtype=np.int32)
        pos, lens, docs = 0, [], []

    for tokens, doc_id in zip(token_lists, doc_ids):
        tokens = np.asarray(tokens, dtype=np.int32)
        start = 0
        while start < len(tokens):
            room = max_len - pos
            if room < min(min_fragment, len(tokens) - start) + 2:
                close_row()
                continue
            take = min(len(tokens) - start, room - 2)
            end = pos + take + 2
            row[pos] = cls_id
            row[pos + 1:end - 1] = tokens[start:start + take]
            row[end - 1] = sep_id
            lens.append(take + 2)
            docs.append(doc_id)
            pos, start = end, start + take
    if pos:
        close_row()
    return {
        "input_ids": np.stack(rows) if rows else np.zeros((0, max_len), dtype=np.int32),
        "seq_lens": _object_array(row_lens),
        "doc_ids": _object_array(row_docs),
    }


def _object_array(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


class TokenizeAndPack:
    """Ray Data actor: holds one tokenizer, turns a batch of {id, text} into packed rows."""

    def __init__(self, tokenizer_json: str, max_len: int, special_ids: dict[str, int]) -> None:
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_len = max_len
        self.special_ids = special_ids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(list(batch["text"]), add_special_tokens=False)
        return pack_segments(
            [e.ids for e in encodings], list(batch["id"]), self.max_len,
            self.special_ids["cls"], self.special_ids["sep"], self.special_ids["pad"],
        )
