"""Long documents for cross-encoders: the passages of a document that best match a query.

A reranker reads a few hundred tokens of a pair; a meeting transcript holds tens of thousands, and
the part a question is about is rarely its beginning. Each document is cut into overlapping word
windows, and its windows are ranked by BM25 (Robertson & Zaragoza 2009) against the query, with
term statistics from that document's own windows, so no corpus pass is needed. The reranker then
scores the best windows and a document takes its best window's score (MaxP, Dai & Callan 2019).
Training picks the positive's and each negative's best window the same way. The same BM25 over a
corpus's whole documents is a teacher for long documents (teacher-scores, llm.backend=bm25).
"""

from __future__ import annotations

import math
import re
from collections import Counter

WORDS = re.compile(r"\S+")
TERMS = re.compile(r"\w+")


def word_windows(text: str, words: int, overlap: int) -> list[str]:
    """Windows of `words` whitespace-separated words, consecutive ones sharing `overlap` words; a text
    that fits is one window, unchanged."""
    if overlap >= words:
        raise ValueError(f"passage overlap {overlap} must be below the passage length {words} words")
    spans = [m.span() for m in WORDS.finditer(text)]
    if len(spans) <= words:
        return [text]
    stride = words - overlap
    starts = range(0, len(spans) - overlap, stride)
    return [text[spans[s][0]:spans[min(s + words, len(spans)) - 1][1]] for s in starts]


def bm25_terms(text: str) -> list[str]:
    return TERMS.findall(text.lower())


class BM25Index:
    """Texts with their term counts, built once and searched by any number of queries (in evaluation a
    document's windows are candidates of many queries; a teacher scores whole documents of a corpus)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.counts = [Counter(bm25_terms(t)) for t in texts]
        self.lengths = [sum(c.values()) for c in self.counts]
        self.average = sum(self.lengths) / len(self.lengths) or 1.0
        self.frequencies = Counter(t for c in self.counts for t in c)  # texts holding each term

    def scores(self, query: str, k1: float = 0.9, b: float = 0.4, among: list[int] | None = None) -> list[float]:
        """BM25 of the query against each text (or the texts at positions `among`), document frequencies
        counted over all the texts (Lucene's variant, without the constant (k1 + 1) factor; Anserini's
        default k1 and b)."""
        n = len(self.texts)
        query_terms = set(bm25_terms(query))
        idf = {t: math.log(1 + (n - self.frequencies[t] + 0.5) / (self.frequencies[t] + 0.5)) for t in query_terms}
        scores = []
        for i in range(n) if among is None else among:
            c, norm = self.counts[i], k1 * (1 - b + b * self.lengths[i] / self.average)
            scores.append(sum(idf[t] * c[t] / (c[t] + norm) for t in query_terms if c[t]))
        return scores

    def best(self, query: str, count: int = 1) -> list[str]:
        """The `count` texts that best match the query, best first (ties: earlier first)."""
        if len(self.texts) == 1:
            return self.texts
        scores = self.scores(query)
        order = sorted(range(len(self.texts)), key=lambda i: (-scores[i], i))
        return [self.texts[i] for i in order[:count]]


def bm25_scores(query: str, passages: list[str], k1: float = 0.9, b: float = 0.4) -> list[float]:
    return BM25Index(passages).scores(query, k1, b)


def best_passages(query: str, text: str, words: int, overlap: int, count: int = 1) -> list[str]:
    """The document's `count` windows that best match the query, best first."""
    return BM25Index(word_windows(text, words, overlap)).best(query, count)
