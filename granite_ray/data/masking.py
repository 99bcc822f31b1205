"""MLM masking, applied on the fly on each training worker (BERT 80/10/10 rule).

Inputs: packed `input_ids` [B, L] and a `maskable` bool mask (False on [CLS]/[SEP]/[PAD]).
Returns (masked inputs, labels with -100 where no prediction is asked).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    probability: float,
    mask_id: int,
    random_low: int,
    random_high: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    chosen = (draw < probability) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    # Reuse the draw: among chosen, draw/probability is uniform on [0, 1).
    share = draw / probability
    inputs = input_ids.clone()
    inputs[chosen & (share < 0.8)] = mask_id
    randomize = chosen & (share >= 0.8) & (share < 0.9)
    random_ids = torch.randint(random_low, random_high, input_ids.shape, generator=generator, device=input_ids.device)
    inputs[randomize] = random_ids[randomize].to(inputs.dtype)
    return inputs, labels
