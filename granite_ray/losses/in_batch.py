"""In-batch negatives for a dot-product retriever (SPLADE, Formal et al. 2021; InfoNCE).

Inputs: query vectors [B, d] and passage vectors [B * (1 + n), d] whose first B rows are the
queries' positives (row i for query i), then any mined negatives. Each query's softmax runs
over every passage of the batch, scored by dot product over a temperature. Distillation over a
query's own few candidates never shows it the rest of the corpus; these negatives do. Equals
sentence-transformers' SparseMultipleNegativesRankingLoss with scale = 1 / temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def in_batch_ranking_loss(queries: torch.Tensor, passages: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logits = queries @ passages.T / temperature
    return F.cross_entropy(logits, torch.arange(queries.shape[0], device=queries.device))
