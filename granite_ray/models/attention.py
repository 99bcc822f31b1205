"""Attention over packed rows: each segment attends only to itself, as if encoded alone.

One interface, three mechanisms chosen by the model's attention implementation:
- flash_attention_2 (GPU): no mask; cumulative segment lengths drive flash-attn's varlen kernel;
- sdpa_varlen (CPU, and GPUs without flash-attn): the same cumulative lengths, each segment
  attended alone by PyTorch sdpa, so attention costs sum(len^2) rather than rows x row_len^2
  (causally for decoders, whose attention modules say `is_causal`);
- sdpa / eager: block-diagonal 4D masks, one for global layers and one for ModernBERT's
  sliding-window layers (the reference the other two are tested against).
Positions restart at 0 in every segment, so RoPE sees the same positions as unpacked input.
The padding at the end of a row is treated as one more segment, whose outputs are ignored.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "sdpa_varlen")


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


def block_diagonal_masks(segments: torch.Tensor, half_window: int, additive_dtype: torch.dtype | None = None,
                         allowed: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{"full_attention", "sliding_attention"} masks [B, 1, L, L]: bool for sdpa, additive for eager;
    `allowed` [B, L, L] narrows them further (a table's structure)."""
    same = segments[:, :, None] == segments[:, None, :]
    if allowed is not None:
        same = same & allowed.to(same.device)
    idx = torch.arange(segments.shape[1], device=segments.device)
    near = (idx[:, None] - idx[None, :]).abs() <= half_window
    masks = {"full_attention": same[:, None], "sliding_attention": (same & near)[:, None]}
    if additive_dtype is not None:
        low = torch.finfo(additive_dtype).min
        masks = {k: torch.zeros(m.shape, dtype=additive_dtype, device=m.device).masked_fill(~m, low) for k, m in masks.items()}
    return masks


def packed_model_inputs(seq_lens: Sequence[Sequence[int]], row_len: int, attn_implementation: str, half_window: int,
                        device=None, dtype: torch.dtype = torch.float32, allowed: torch.Tensor | None = None) -> dict:
    """Keyword arguments for a ModernBERT forward over packed rows of `row_len` tokens. `allowed`
    [B, L, L] (which token may attend to which) takes the 4D masks for every implementation but
    flash-attn's, which has none: sdpa_varlen then attends through them as plain sdpa does."""
    segments, positions = segment_ids_and_positions(seq_lens, row_len, device)
    if attn_implementation in VARLEN_IMPLEMENTATIONS and allowed is None:
        lens = torch.tensor([n for row in full_segment_lengths(seq_lens, row_len) for n in row], dtype=torch.int32)
        cu = torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0)).to(device)
        longest = int(lens.max())
        return {
            "attention_mask": {"full_attention": None, "sliding_attention": None},
            "position_ids": positions,
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
        }
    if attn_implementation == "flash_attention_2":
        raise ValueError("flash_attention_2 takes no attention mask: attend with sdpa_varlen to narrow attention")
    additive = dtype if attn_implementation == "eager" else None
    return {"attention_mask": block_diagonal_masks(segments, half_window, additive, allowed), "position_ids": positions}


def table_attention(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The M1 mask (Mouravieff et al. 2025, arXiv:2503.01457) [B, L, L] from each token's table row and
    column [B, L]: a token attends to the tokens of its row and of its column (its header included),
    and tokens of row -1 ([CLS], the [SEP]s) attend to all and are attended by all. Padding is row -1
    too; the segments of `block_diagonal_masks` keep it apart."""
    free = rows < 0
    return (free[:, :, None] | free[:, None, :] | (rows[:, :, None] == rows[:, None, :])
            | (cols[:, :, None] == cols[:, None, :]))


def _band(length: int, sliding_window: int | None, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Additive band mask (0 inside, -inf outside; sdpa would convert a boolean one on every call).
    ModernBERT passes sliding_window = half window + 1 (flash-attn's inclusive bound). Masks of up
    to 1024 tokens are cached (at most 128 of them): a packed batch asks for the same few lengths
    in every sliding layer of every step."""
    if sliding_window is None or length <= sliding_window:
        return None
    return (_cached_band if length <= 1024 else _band_mask)(length, sliding_window, dtype, device)


def _band_mask(length: int, sliding_window: int, dtype: torch.dtype, device) -> torch.Tensor:
    idx = torch.arange(length, device=device)
    inside = (idx[:, None] - idx[None, :]).abs() < sliding_window
    return torch.zeros((1, 1, length, length), dtype=dtype, device=device).masked_fill_(~inside, float("-inf"))


_cached_band = functools.lru_cache(maxsize=128)(_band_mask)


def _equal_length_runs(cu_seq_lens: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start token, segment count, length) of each maximal run of consecutive equal-length segments."""
    bounds = cu_seq_lens.tolist()
    runs: list[list[int]] = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if runs and runs[-1][2] == end - start:
            runs[-1][1] += 1
        else:
            runs.append([start, 1, end - start])
    return [tuple(r) for r in runs]


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                        sliding_window: int | None = None, cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """Rows flattened as flash-attn varlen sees them; each run of equal-length segments is one sdpa
    call over views (no gathers). Plain sdpa when no lengths are given.

    The runs are cut with one `split` (whose backward is one concatenation), not a slice per run,
    whose backward would each fill and add a zero gradient the size of the whole batch."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    causal = kwargs.get("is_causal") if kwargs.get("is_causal") is not None else getattr(module, "is_causal", False)
    batch, heads, row_len, head_dim = query.shape
    if key.shape[1] != heads:  # grouped-query attention (Llama, Mistral): each key/value head serves several
        key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // value.shape[1])
    runs = _equal_length_runs(cu_seq_lens_q)
    sizes = [count * length for _, count, length in runs]
    pieces = [t.transpose(0, 1).reshape(heads, batch * row_len, head_dim).split(sizes, dim=1) for t in (query, key, value)]
    outputs = []
    for (_, count, length), *qkv in zip(runs, *pieces):
        q, k, v = (t.reshape(heads, count, length, head_dim).transpose(0, 1) for t in qkv)
        band = _band(length, sliding_window, q.dtype, q.device)
        if causal and band is not None:  # a decoder's sliding window (Mistral, Qwen2): the band's lower half
            band = band.masked_fill(torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=band, dropout_p=dropout, scale=scaling, is_causal=bool(causal) and band is None and length > 1)
        outputs.append(out.transpose(1, 2).reshape(count * length, heads, head_dim))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return out.reshape(batch, row_len, heads, head_dim), None


AttentionInterface.register("sdpa_varlen", sdpa_varlen_forward)
def sdpa_varlen_mask(*args, attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                     **kwargs) -> torch.Tensor | None:
    """sdpa's masks for padded batches and sliding windows. Without padding or a window there is none to
    build: packed rows are kept apart by their lengths (a decoder would otherwise get a row x row mask
    from its restarting positions), and a single sequence is attended with sdpa's own causal flag."""
    if attention_mask is None and local_size is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, local_size=local_size, **kwargs)


AttentionMaskInterface.register("sdpa_varlen", sdpa_varlen_mask)
