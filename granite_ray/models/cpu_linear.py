"""fp32 linear layers on oneDNN with their weights reordered once, for CPU inference.

torch's fp32 `nn.Linear` on CPU calls MKL's sgemm, which on AMD EPYC with AVX-512 ran
all-MiniLM-L6-v2's shapes at 121-150 GFLOP/s on 2 cores; oneDNN with the weight prepacked into its
blocked layout ran them at 190-207 (near the cores' peak), and the encoder's documents/s rose 1.31x
at cosine 0.9999999 to the unpacked model. On AVX2 the two were within noise of each other, so
`auto` packs only where the CPU has AVX-512. Inference only: a packed weight has no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from granite_ray.errors import UserError


class PrepackedLinear(nn.Module):
    """`nn.Linear`'s forward through oneDNN, on a weight reordered once at load instead of every call."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_onednn_linear(choice: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model's linear layers go to oneDNN: `onednn`, or `auto` on an fp32 CPU model where
    torch reports AVX-512 kernels; `onednn` anywhere oneDNN cannot run it is a configuration error."""
    runnable = device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
    if choice == "onednn" and not runnable:
        raise UserError(f"cpu_linear=onednn needs an fp32 model on a CPU with oneDNN, not {dtype} on {device.type}")
    if choice == "auto":
        return runnable and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return choice == "onednn"


def prepack_linears(model: nn.Module, choice: str = "onednn") -> int:
    """Replace every `nn.Linear` in the model by a `PrepackedLinear` where `use_onednn_linear` says so, on the
    model's own device and dtype; returns how many were replaced."""
    weight = next(model.parameters())
    if not use_onednn_linear(choice, weight.device, weight.dtype):
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PrepackedLinear(child))
                replaced += 1
    return replaced
