"""Training metrics: model FLOPs and MFU, a per-step JSONL log beside the checkpoints, a loss plot."""

from __future__ import annotations

import io
import json
import time

import torch

from granite_ray import storage

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by substring of the device name.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def encoder_flops_per_token(config, seq_len: int, predicted_fraction: float = 1.0) -> float:
    """Training FLOPs per token (3x forward) of a ModernBERT-style encoder, PaLM-style accounting.

    Matmuls: 2 FLOPs per weight (Wqkv+Wo = 4h^2, GeGLU Wi+Wo = 3hi); attention: 4*h*context per layer,
    context = the row length in global layers and the window in local ones; the MLM head
    (h^2 + h*V) only on the predicted fraction of tokens.
    """
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    forward = 0.0
    for layer_type in config.layer_types:
        context = seq_len if layer_type == "full_attention" else min(seq_len, config.local_attention)
        forward += 2 * (4 * h * h + 3 * h * i) + 4 * h * context
    forward += 2 * predicted_fraction * (h * h + h * v)
    return 3 * forward


def dense_flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token of any transformer (Kaplan et al. 2020): every weight outside embedding
    tables (lookups cost none) costs 2 forward and 2 for its input's gradient, and 2 more for its own
    gradient only where it trains: 6 in full training, about 4 under LoRA's frozen base."""
    weights = [p for m in model.modules() if not isinstance(m, torch.nn.Embedding) for p in m.parameters(recurse=False)]
    return sum((6 if p.requires_grad else 4) * p.numel() for p in weights)


def measured_matmul_peak(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large fp32 matmul on this worker's threads: the CPU's practical peak."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, configured: float | None) -> float:
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    return measured_matmul_peak(device)


class MetricsLog:
    """Per-step records on rank 0, kept as metrics.jsonl under the run's checkpoint folder."""

    def __init__(self, run_uri: str, resumed_step: int) -> None:
        self.uri = storage.join(run_uri, "metrics.jsonl")
        self.records: list[dict] = []
        if resumed_step and storage.exists(self.uri):
            lines = storage.read_bytes(self.uri).decode().splitlines()
            self.records = [r for r in map(json.loads, lines) if r["step"] <= resumed_step]

    def append(self, record: dict) -> None:
        self.records.append(record)

    def jsonl(self) -> bytes:
        return "".join(json.dumps(r) + "\n" for r in self.records).encode()

    def flush(self) -> None:
        storage.write_bytes(self.uri, self.jsonl())


def loss_plot_png(records: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
