"""MLM masking, applied on the fly on each training worker (BERT 80/10/10 rule).

Inputs: packed `input_ids` [B, L], a `maskable` bool mask (False on [CLS]/[SEP]/[PAD]) and the ids a
random replacement may draw (`replacement_ids`: every real token, wherever the specials sit).
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
    replacements: torch.Tensor,
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
    draws = torch.randint(0, len(replacements), input_ids.shape, generator=generator, device=input_ids.device)
    inputs[randomize] = replacements.to(input_ids.device)[draws[randomize]].to(inputs.dtype)
    return inputs, labels


def replacement_ids(tokenizer) -> torch.Tensor:
    """The vocabulary without its special tokens: ModernBERT's sit at the top (50281-50284), BERT's at
    the bottom, so no id range stands for "a real token"."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)
