"""Retrieval metrics with trec_eval's conventions (as pytrec_eval and mteb compute them).

Inputs: qrels {query_id: {doc_id: relevance}} and a run {query_id: {doc_id: score}}. Ranking
is by score, ties broken by doc id descending (trec_eval); gains are the graded relevance
(linear). Every judged query counts; one with no relevant document scores 0.
"""

from __future__ import annotations

import math


def ranked(scores: dict[str, float]) -> list[str]:
    return [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def ndcg_at_k(relevant: dict[str, int], ranking: list[str], k: int) -> float:
    dcg = sum(relevant.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranking[:k]) if relevant.get(doc, 0) > 0)
    ideal = sorted((r for r in relevant.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at_k(relevant: dict[str, int], ranking: list[str], k: int) -> float:
    positives = {doc for doc, r in relevant.items() if r > 0}
    return len(positives.intersection(ranking[:k])) / len(positives) if positives else 0.0


def mrr_at_k(relevant: dict[str, int], ranking: list[str], k: int) -> float:
    for i, doc in enumerate(ranking[:k]):
        if relevant.get(doc, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def per_query_scores(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {query: score}} for NDCG@10, Recall@5 (MT-RAG's, R2 section 5.1), Recall@100 and MRR@10 over
    judged queries (a query with no results scores 0): what a paired significance test compares."""
    scores: dict[str, dict[str, float]] = {"ndcg_at_10": {}, "recall_at_5": {}, "recall_at_100": {}, "mrr_at_10": {}}
    for query in qrels:
        ranking = ranked(run.get(query, {}))
        scores["ndcg_at_10"][query] = ndcg_at_k(qrels[query], ranking, 10)
        scores["recall_at_5"][query] = recall_at_k(qrels[query], ranking, 5)
        scores["recall_at_100"][query] = recall_at_k(qrels[query], ranking, 100)
        scores["mrr_at_10"][query] = mrr_at_k(qrels[query], ranking, 10)
    return scores


def retrieval_scores(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict:
    """Mean NDCG@10, Recall@5, Recall@100 and MRR@10 over judged queries, and the per-query scores behind them."""
    per_query = per_query_scores(qrels, run)
    means = {name: sum(values.values()) / max(len(qrels), 1) for name, values in per_query.items()}
    return means | {"queries": len(qrels), "per_query": per_query}
