"""Cross-entropy of a linear output layer, fused and chunked (Cut Cross-Entropy, Wijmans et al. 2024; Liger Kernel, Hsu et al. 2024).

Inputs: hidden states [N, d], the output layer's weight [V, d] and bias [V] (or None), and
targets [N]. Returns the mean cross-entropy of `hidden @ weight.T + bias` against the targets,
equal to `F.cross_entropy` on those logits. The [N, V] logits are never held whole: rows are
taken a chunk at a time, and each chunk's gradients are computed while its logits are still
hot in cache, so an MLM head's softmax over the vocabulary costs matmuls rather than passes
over a large tensor in memory (half of a small encoder's step when materialised).
"""

from __future__ import annotations

import torch

# A chunk's logits stay around 8 MB in fp32: in a CPU's cache, a small share of a GPU's memory.
CHUNK_ELEMENTS = 1 << 21


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        rows = hidden.shape[0]
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # Parameter gradients accumulate over chunks in fp32 (autograd casts them to the parameters' dtype).
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        weight = weight.to(hidden.dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk_rows):
            h = hidden[start:start + chunk_rows]
            t = targets[start:start + chunk_rows]
            logits = (h @ weight.T if bias is None else torch.addmm(bias.to(h.dtype), h, weight.T)).float()
            target_logits = logits.gather(1, t[:, None]).squeeze(1)
            peak = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(peak).exp_()  # in place: the chunk's logits become its softmax numerators
            norm = exp.sum(dim=1, keepdim=True)
            total += (peak.squeeze(1) + norm.log().squeeze(1) - target_logits).sum()
            # d(mean CE)/d(logits) = (softmax - one_hot) / N
            grad_logits = exp.div_(norm * rows)
            grad_logits[torch.arange(len(t), device=t.device), t] -= 1 / rows
            grad_logits = grad_logits.to(h.dtype)
            if want_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[start:start + chunk_rows])
            if want_weight:
                grad_weight.addmm_(grad_logits.T.float(), h.float())
            if want_bias:
                grad_bias += grad_logits.sum(0, dtype=torch.float32)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        return total / rows

    @staticmethod
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_output if want else None for want in ctx.needs_input_grad[:3]]
        return grads[0], grads[1], grads[2], None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against `targets` (no ignored positions:
    select the predicted rows first). No rows: a zero loss with zero gradients."""
    if hidden.shape[0] == 0:
        return hidden.sum().float() * 0  # every parameter but the layer's keeps its gradient path
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {targets.shape[0]} targets")
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows)
