"""Sparsity regularizers of a SPLADE encoder's term weights.

Inputs: term weights [B, vocab] (non-negative, from granite_ray.inference.encoder.packed_splade) of the
queries, or of the passages, of a batch.
- FLOPS (Paria et al. 2020, used by SPLADE): sum_j (mean_i w_ij)^2, a smooth proxy for the
  number of floating-point operations of an inverted-index search; it penalises terms that are
  active across many texts.
- NORM (Granite Embedding R1, eq. 10): sum_j w_j per text, averaged over the batch, an L1 norm
  that pulls every term weight towards zero when FLOPS alone leaves the model too dense.
"""

from __future__ import annotations

import torch


def flops_regularizer(weights: torch.Tensor) -> torch.Tensor:
    return torch.sum(torch.mean(weights, dim=0) ** 2)


def norm_regularizer(weights: torch.Tensor) -> torch.Tensor:
    return weights.sum(dim=1).mean()
