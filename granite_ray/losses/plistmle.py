"""Position-aware ListMLE (Lan et al. 2014, "Position-Aware ListMLE"), the Granite R2 reranker loss.

Inputs: scores [B, n] of each query's candidates listed best first (the positive, then the
mined negatives in teacher-score order). The Plackett-Luce log-likelihood of that order, each
position i weighted by 2^(n-i) - 1 (normalized per list), so mistakes at the top cost most.
`ranked_positions=k` keeps only the first k positions' terms (top-k ListMLE, Xia et al. 2009): with
k = 1 only "the positive comes first" is learned (softmax cross-entropy over the list), for
teacher orders that carry no signal.
"""

from __future__ import annotations

import torch


def plistmle_loss(scores: torch.Tensor, ranked_positions: int | None = None) -> torch.Tensor:
    n = scores.shape[1]
    ranks = torch.arange(1, n + 1, device=scores.device, dtype=torch.float32)
    weights = torch.pow(2.0, n - ranks) - 1
    if ranked_positions is not None:
        weights[ranked_positions:] = 0
    weights = weights / weights.sum()
    scores = scores.float()
    # log P(item i first among items i..n) = s_i - logsumexp(s_i, ..., s_n)
    log_normalizers = torch.flip(torch.logcumsumexp(torch.flip(scores, [1]), dim=1), [1])
    return -((scores - log_normalizers) * weights).sum(dim=1).mean()
