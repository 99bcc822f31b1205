"""Exact top-k by inner product, in corpus blocks so no full query x corpus matrix exists."""

from __future__ import annotations

import numpy as np
import torch


def top_k(queries: np.ndarray, corpus: np.ndarray, k: int, block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices) [n_queries, min(k, n_docs)], best first."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    k = min(k, len(corpus))
    best_scores = torch.full((len(q), k), -torch.inf)
    best_index = torch.zeros((len(q), k), dtype=torch.long)
    for start in range(0, len(corpus), block):
        scores = q @ torch.from_numpy(np.ascontiguousarray(corpus[start:start + block], dtype=np.float32)).T
        scores, index = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_index = torch.cat([best_index, index + start], dim=1)
        best_scores, pick = merged_scores.topk(k, dim=1)
        best_index = merged_index.gather(1, pick)
    return best_scores.numpy(), best_index.numpy()
