"""The one parser of raw record lines (from `read_record_lines`), and its one bad-row policy.

Ray Data workers import it: no torch or transformers here.
"""

from __future__ import annotations

import json
from typing import Any, Callable, TypeVar

import numpy as np
import ray

T = TypeVar("T")


class RowError(ValueError):
    """A row lacks a field or has the wrong type: the message is the reason rows are counted under;
    `detail`, when given, is shown beside the row's file:line among the dropped examples."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.detail = detail


def text_columns(rows: list[tuple[str, ...]], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Parsed rows of strings -> one object column per name (empty columns for an empty batch)."""
    return {name: np.array([row[i] for row in rows], dtype=object) for i, name in enumerate(names)}


def parse_lines(batch: dict[str, np.ndarray], parse: Callable[[Any, str], T], counter=None) -> list[T]:
    """Each raw line through `parse(record, where)`, `where` being its file:line. A row that is not
    UTF-8, not JSON, or that `parse` refuses with a RowError is dropped and counted by reason when a
    drop `counter` is given (training data: a few bad rows among millions), and fails the job with its
    file:line and reason when none is (rows the next step must cover whole: a corpus to evaluate, the
    rows a teacher scores)."""
    rows: list[T] = []
    dropped: list[tuple[str, str]] = []
    for line, source, number in zip(batch["line"], batch["source"], batch["lineno"]):
        where = f"{source}:{number}"
        detail = None
        try:
            rows.append(parse(json.loads(line.decode("utf-8") if isinstance(line, bytes) else line), where))
            continue
        except UnicodeDecodeError:
            reason = "invalid_utf8"
        except json.JSONDecodeError:
            reason = "bad_json"
        except RowError as err:
            reason, detail = str(err), err.detail
        if counter is None:
            raise RowError(f"{where}: {reason}" + (f" ({detail})" if detail else ""))
        dropped.append((reason, f"{where}: {detail}" if detail else where))
    if dropped:
        ray.get(counter.add.remote(dropped))  # counted before the batch moves on
    return rows
