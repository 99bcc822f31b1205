"""Optimizers and learning-rate schedules shared by every stage."""

from __future__ import annotations

import math

import torch

from granite_ray.config import TrainConfig


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and embeddings (ModernBERT's recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "norm" in name or "embeddings" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer == "stableadamw":
        from optimi import StableAdamW

        # optimi's StableAdamW: AdamW with AdaFactor-style update clipping (Wortsman et al. 2023).
        # Its Triton kernels are for GPUs; on CPU parameters optimi's probe of Triton fails.
        on_gpu = next(model.parameters()).is_cuda and not cfg.offload
        return StableAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           triton=None if on_gpu else False)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay (Hu et al. 2024): linear warmup, flat, then a 1-sqrt decay to zero.

    `constant` keeps the warmup and drops the decay (stage 2); `decay` is the 1-sqrt decay over
    every step after the warmup (stage 3).
    """
    total = cfg.max_steps
    warmup = int(round(cfg.warmup_fraction * total))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    decay = total - warmup if cfg.schedule == "decay" else int(round(cfg.decay_fraction * total))
    decay_start = total - decay
    if decay and step >= decay_start:
        progress = (step - decay_start) / decay
        return max(0.0, 1.0 - math.sqrt(progress))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
