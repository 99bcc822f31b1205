"""Passage selection for cross-encoders over long documents: word windows that cover the text, BM25
equal to bm25s' Lucene variant, and the window about the query found inside a long document."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA

from granite_ray.data.passages import best_passages, bm25_scores, bm25_terms, word_windows


def _cranfield(limit: int) -> list[dict]:
    lines = (SHARED_DATA / "cranfield" / "corpus.jsonl").read_text().splitlines()[:limit]
    return [json.loads(line) for line in lines]


def test_bm25_equals_bm25s_lucene():
    import bm25s

    passages = [d["text"] for d in _cranfield(60)]
    retriever = bm25s.BM25(method="lucene", k1=0.9, b=0.4)
    retriever.index([bm25_terms(p) for p in passages], show_progress=False)
    for query in ("boundary layer transition on a flat plate", "heat transfer at hypersonic speeds", "zzz unknown"):
        theirs = retriever.get_scores(bm25_terms(query))
        assert bm25_scores(query, passages) == pytest.approx(list(theirs), rel=1e-5, abs=1e-6)


def test_word_windows_cover_the_text_with_the_stated_overlap():
    text = " ".join(f"w{i}" for i in range(103))
    windows = word_windows(text, words=20, overlap=5)
    split = [w.split() for w in windows]
    assert all(len(w) == 20 for w in split[:-1]) and 5 < len(split[-1]) <= 20
    assert all(a[-5:] == b[:5] for a, b in zip(split, split[1:]))
    assert split[0] + [w for ws in split[1:] for w in ws[5:]] == text.split()  # every word, in order, once past the overlap
    assert word_windows("short text", words=20, overlap=5) == ["short text"]
    with pytest.raises(ValueError, match="overlap"):
        word_windows(text, words=5, overlap=5)


def test_best_passage_finds_the_part_of_a_long_document_the_query_is_about():
    docs = _cranfield(40)
    target = docs[23]
    document = "\n".join(d["text"] for d in docs)  # ~40 abstracts, the target's in the middle
    query = target["title"]
    (best,) = best_passages(query, document, words=60, overlap=10)
    assert len(best.split()) <= 60
    assert best in document
    target_words = set(target["text"].split())
    assert len(set(best.split()) & target_words) >= 0.5 * len(set(best.split())), best
    two = best_passages(query, document, words=60, overlap=10, count=2)
    assert two[0] == best and two[1] != best
