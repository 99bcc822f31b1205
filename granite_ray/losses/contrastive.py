"""Improved contrastive loss of GTE (Li et al. 2023, arXiv:2308.03281), used for Granite R2's
contrastive fine-tuning.

Inputs: query embeddings [B, d], their positives [B, d], optional hard negatives [B, n, d];
cosine similarities over a temperature. One softmax per query over its positive and, as
negatives: every other document of the batch (q->d), and with the switches the other queries
(q->q), the other queries seen from its positive (d->q) and the other documents seen from its
positive (d->d). With all switches off this is InfoNCE with in-batch negatives.
Optional `doc_ids` (positives [B], negatives [B, n], and optionally query ids [B]) mask any other
column holding a document known to be this query's positive: its own, and with query ids the
positives of other rows asking the same query (one row per judged positive puts several in a
batch); other copies of the same query are masked in q->q and d->q too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def improved_contrastive_loss(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
                              temperature: float = 0.05, query_query: bool = False, doc_query: bool = False,
                              doc_doc: bool = False, doc_ids: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    batch = queries.shape[0]
    q = F.normalize(queries, dim=-1)
    pos = F.normalize(positives, dim=-1)
    docs = [pos]
    if negatives is not None:
        docs += list(F.normalize(negatives, dim=-1).transpose(0, 1))  # n tensors of [B, d], column-wise
    all_docs = torch.cat(docs)  # [B * (1 + n), d]: positives first, then each negative column
    rows = torch.arange(batch, device=q.device)
    own = torch.eye(batch, dtype=torch.bool, device=q.device).repeat(1, len(docs))  # each row's own positive/negatives
    eye = torch.eye(batch, dtype=torch.bool, device=q.device)
    duplicate, same_query = torch.zeros_like(own), eye
    if doc_ids is not None:
        pos_ids, neg_ids, *query_ids = doc_ids
        if query_ids and query_ids[0] is not None:
            same_query = query_ids[0][:, None] == query_ids[0][None, :]
        all_ids = torch.cat([pos_ids] + (list(neg_ids.T) if neg_ids is not None else []))
        # Column j is a positive of row i's query if it holds the positive of any row k asking that query.
        known_positive = (same_query.float() @ (pos_ids[:, None] == all_ids[None, :]).float()) > 0
        duplicate = known_positive & ~torch.eye(batch, len(all_ids), dtype=torch.bool, device=q.device)
    terms = [(q @ all_docs.T).masked_fill(duplicate, -torch.inf)]
    if query_query:
        terms.append((q @ q.T).masked_fill(same_query, -torch.inf))
    if doc_query:
        terms.append((pos @ q.T).masked_fill(same_query & ~eye, -torch.inf))
    if doc_doc:
        terms.append((pos @ all_docs.T).masked_fill(own | duplicate, -torch.inf))
    logits = torch.cat(terms, dim=1) / temperature
    return (torch.logsumexp(logits, dim=1) - logits[rows, rows]).mean()
