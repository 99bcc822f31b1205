"""Attention over packed rows: each segment attends only to itself, as if encoded alone.

One interface, two mechanisms chosen by the model's attention implementation:
- sdpa / eager (CPU, and GPUs without flash-attn): block-diagonal 4D masks, one for global
  layers and one for ModernBERT's sliding-window layers;
- flash_attention_2 (GPU): no mask; cumulative segment lengths drive flash-attn's varlen kernel.
Positions restart at 0 in every segment, so RoPE sees the same positions as unpacked input.
The padding at the end of a row is treated as one more segment, whose outputs are ignored.
"""

from __future__ import annotations

from typing import Sequence

import torch


def full_segment_lengths(seq_lens: Sequence[Sequence[int]], row_len: int) -> list[list[int]]:
    """Each row's segment lengths with the trailing padding added as a final segment."""
    rows = []
    for lens in seq_lens:
        lens = [int(n) for n in lens]
        used = sum(lens)
        if used > row_len:
            raise ValueError(f"segments of {used} tokens do not fit a row of {row_len}")
        rows.append(lens + ([row_len - used] if used < row_len else []))
    return rows


def segment_ids_and_positions(seq_lens: Sequence[Sequence[int]], row_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    segments = torch.empty((len(seq_lens), row_len), dtype=torch.long)
    positions = torch.empty((len(seq_lens), row_len), dtype=torch.long)
    for r, lens in enumerate(full_segment_lengths(seq_lens, row_len)):
        lens_t = torch.tensor(lens, dtype=torch.long)
        segments[r] = torch.repeat_interleave(torch.arange(len(lens)), lens_t)
        starts = torch.repeat_interleave(torch.cumsum(lens_t, 0) - lens_t, lens_t)
        positions[r] = torch.arange(row_len) - starts
    return segments.to(device), positions.to(device)


def block_diagonal_masks(segments: torch.Tensor, half_window: int, additive_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """{"full_attention", "sliding_attention"} masks [B, 1, L, L]: bool for sdpa, additive for eager."""
    same = segments[:, :, None] == segments[:, None, :]
    idx = torch.arange(segments.shape[1], device=segments.device)
    near = (idx[:, None] - idx[None, :]).abs() <= half_window
    masks = {"full_attention": same[:, None], "sliding_attention": (same & near)[:, None]}
    if additive_dtype is not None:
        low = torch.finfo(additive_dtype).min
        masks = {k: torch.zeros(m.shape, dtype=additive_dtype, device=m.device).masked_fill(~m, low) for k, m in masks.items()}
    return masks


def packed_model_inputs(seq_lens: Sequence[Sequence[int]], row_len: int, attn_implementation: str, half_window: int,
                        device=None, dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments for a ModernBERT forward over packed rows of `row_len` tokens."""
    segments, positions = segment_ids_and_positions(seq_lens, row_len, device)
    if attn_implementation == "flash_attention_2":
        lens = torch.tensor([n for row in full_segment_lengths(seq_lens, row_len) for n in row], dtype=torch.int32)
        cu = torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0)).to(device)
        longest = int(lens.max())
        return {
            "attention_mask": {"full_attention": None, "sliding_attention": None},
            "position_ids": positions,
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
        }
    additive = dtype if attn_implementation == "eager" else None
    return {"attention_mask": block_diagonal_masks(segments, half_window, additive), "position_ids": positions}
