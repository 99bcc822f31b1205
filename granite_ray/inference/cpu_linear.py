"""CPU inference's matrix products from whichever library this CPU runs faster: MKL's sgemm (torch's
default) or oneDNN with each weight reordered once into its blocked layout (what vLLM's CPU backend
uses, `onednn_mm`).

Which wins depends on the CPU: on an AMD Zen 3 host (AVX2) both ran all-MiniLM-L6-v2's products at
135-165 GFLOP/s on 2 cores, while on a Zen 4 host (AVX-512) vLLM's server, with the same model and
threads, ran 1.6x our MKL-backed encoder (benchmarks/serve.py, 2026-12-03). So the choice is measured
when a model loads, on its own weight shapes and token budget, rather than fixed.
"""

from __future__ import annotations

import functools
import time
from typing import Literal

import torch


class PrepackedLinear(torch.nn.Module):
    """A frozen nn.Linear whose weight is held in oneDNN's blocked layout (inference only)."""

    def __init__(self, linear: torch.nn.Linear, batch_tokens: int) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_tokens))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def _seconds(run, repeats: int = 3) -> float:
    run()  # the first call builds oneDNN's primitive
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


@functools.lru_cache(maxsize=32)
@torch.inference_mode()
def faster_library(shapes: tuple[tuple[int, int, int], ...], batch_tokens: int, threads: int) -> Literal["mkl", "onednn"]:
    """The library that runs layers of these (in, out, count) shapes on [batch_tokens, in] inputs in less
    total time with `threads` torch threads; measured once per process and setting."""
    totals = {"mkl": 0.0, "onednn": 0.0}
    for fan_in, fan_out, count in shapes:
        layer = torch.nn.Linear(fan_in, fan_out)
        x = torch.randn(batch_tokens, fan_in)
        prepacked = PrepackedLinear(layer, batch_tokens)
        totals["mkl"] += count * _seconds(lambda: layer(x))
        totals["onednn"] += count * _seconds(lambda: prepacked(x))
    return "onednn" if totals["onednn"] < totals["mkl"] else "mkl"


def use_cpu_library(model: torch.nn.Module, library: Literal["auto", "mkl", "onednn"], batch_tokens: int) -> str:
    """Replace a float32 CPU model's nn.Linear layers by prepacked oneDNN ones when `library` is onednn,
    or is auto and oneDNN measures faster here; returns the library in use."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears or next(model.parameters()).dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return "mkl"
    if library == "auto":
        counts: dict[tuple[int, int], int] = {}
        for linear in linears:
            counts[(linear.in_features, linear.out_features)] = counts.get((linear.in_features, linear.out_features), 0) + 1
        library = faster_library(tuple((i, o, n) for (i, o), n in sorted(counts.items())), batch_tokens, torch.get_num_threads())
    if library == "onednn":
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, PrepackedLinear(child, batch_tokens))
    return library
