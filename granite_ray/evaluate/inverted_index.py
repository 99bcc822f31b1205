"""Sparse retrieval through an inverted index: each vocabulary term owns a postings list of
(document, weight); a query's score for a document is the sum over the query's own terms of
query weight x document weight, accumulated term at a time. Work grows with the postings a
query touches, never with the vocabulary or a dense query x corpus matrix."""

from __future__ import annotations

import numpy as np


class InvertedIndex:
    def __init__(self, terms: list[np.ndarray], weights: list[np.ndarray], vocab_size: int) -> None:
        """terms[i], weights[i]: document i's non-zero term ids and their weights."""
        self.documents = len(terms)
        lengths = np.array([len(t) for t in terms], dtype=np.int64)
        all_terms = np.concatenate(terms).astype(np.int64) if terms else np.zeros(0, np.int64)
        if len(all_terms) and (all_terms.min() < 0 or all_terms.max() >= vocab_size):
            raise ValueError(f"term ids must lie in [0, {vocab_size})")
        order = np.argsort(all_terms, kind="stable")
        self.postings_documents = np.repeat(np.arange(self.documents, dtype=np.int32), lengths)[order]
        self.postings_weights = np.concatenate(weights).astype(np.float32)[order] if terms else np.zeros(0, np.float32)
        self.offsets = np.zeros(vocab_size + 1, dtype=np.int64)
        np.cumsum(np.bincount(all_terms, minlength=vocab_size), out=self.offsets[1:])
        self.postings = len(all_terms)

    def search(self, terms: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, document indices) of the best min(k, documents), best first."""
        scores = np.zeros(self.documents, dtype=np.float32)
        for term, weight in zip(terms.tolist(), weights.tolist()):
            start, end = self.offsets[term], self.offsets[term + 1]
            # A document appears once in a term's postings, so a fancy-index add is exact.
            scores[self.postings_documents[start:end]] += weight * self.postings_weights[start:end]
        k = min(k, self.documents)
        best = np.argpartition(-scores, k - 1)[:k] if k < self.documents else np.arange(self.documents)
        best = best[np.lexsort((best, -scores[best]))]
        return scores[best], best


def sparse_rows(dense: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each row's non-zero term ids (int32) and weights (float32)."""
    terms = [np.flatnonzero(row).astype(np.int32) for row in dense]
    return terms, [row[t].astype(np.float32) for row, t in zip(dense, terms)]
