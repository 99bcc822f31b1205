"""Scores of two scorers on different scales (a cross-encoder's logits, an embedder's cosines) mixed on one:
each standardised over the candidates they rank together, then interpolated by weight."""

from __future__ import annotations

import numpy as np


def standardised(values) -> np.ndarray:
    """Zero mean, unit spread over the given candidates (all zeros where they tie)."""
    values = np.asarray(values, dtype=np.float64)
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)
