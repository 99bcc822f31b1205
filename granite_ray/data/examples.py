"""RetroMAE's examples, made where Ray Data runs: {enc_text[, dec_text]} rows become {enc, dec}
framed token ids. Imports neither torch nor transformers, so its workers start in seconds."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from granite_ray.data.corpus import object_column
from granite_ray.data.rows import RowError, parse_lines, text_columns


class TokenizeExamples:
    """Ray Data actor: {enc_text[, dec_text]} rows -> {enc, dec} framed token ids.

    `windows=True` cuts a long encoder text into consecutive windows, one example each."""

    def __init__(self, tokenizer_json: str, frame: tuple[list[int], list[int]], max_len: int, windows: bool) -> None:
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.prefix, self.suffix = frame
        self.room = max_len - len(self.prefix) - len(self.suffix)
        self.windows = windows

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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


def _summary_row(record, where: str) -> tuple[str, str]:
    if not isinstance(record, dict) or not isinstance(record.get("linearized"), str) or not isinstance(record.get("summary"), str):
        raise RowError("a summarize-tables row needs linearized and summary (strings)")
    return record["linearized"], record["summary"]


def summary_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """summarize-tables parquet rows -> the linearized table and its summary; a malformed row fails the job."""
    rows = parse_lines(batch, _summary_row)
    return text_columns(rows, ("enc_text", "dec_text"))
