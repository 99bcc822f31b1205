"""Masked language modelling over packed rows (stages 1-3; ModernBERT, Warner et al. 2024).

Inputs per batch: packed `input_ids` [B, L] and each row's `seq_lens`. Masking is drawn
on the worker (30%, 80/10/10); the loss is cross-entropy over the masked positions only.
"""

from __future__ import annotations

import numpy as np
import torch

from granite_ray.config import PretrainMLMConfig
from granite_ray.data.masking import mask_tokens, replacement_ids
from granite_ray.models.attention import packed_model_inputs
from granite_ray.models.modernbert import build_mlm_model, save_artifact
from granite_ray.tokenizer import SPECIAL_TOKENS
from granite_ray.train.metrics import encoder_flops_per_token


class MLMObjective:
    def __init__(self, config: PretrainMLMConfig, tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.special_ids = torch.tensor(sorted(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS.values()))))
        self.replacements = replacement_ids(tokenizer)
        self.attn_implementation = "sdpa"

    def build_model(self) -> torch.nn.Module:
        model = build_mlm_model(self.config.model, self.tokenizer, fused_loss=True)
        self.attn_implementation = model.config._attn_implementation
        self.half_window = model.config.sliding_window
        return model

    def flops_per_token(self, model: torch.nn.Module) -> float:
        return encoder_flops_per_token(model.config, self.config.data.max_seq_len, self.config.data.mlm_probability)

    def batch_inputs(self, batch: dict[str, np.ndarray], device: torch.device) -> dict:
        ids = torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long)
        maskable = ~torch.isin(ids, self.special_ids)
        inputs, labels = mask_tokens(
            ids, maskable, self.config.data.mlm_probability, self.tokenizer.mask_token_id, self.replacements,
        )
        kwargs = packed_model_inputs(batch["seq_lens"], ids.shape[1], self.attn_implementation, self.half_window, device)
        return {"input_ids": inputs.to(device), "labels": labels.to(device), **kwargs,
                "_tokens": int(sum(int(np.sum(lens)) for lens in batch["seq_lens"])), "_slots": ids.numel()}

    def loss(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        return model(**{k: v for k, v in inputs.items() if not k.startswith("_")}).loss

    def save_artifact(self, model: torch.nn.Module, uri: str, extra_files: dict[str, bytes]) -> None:
        save_artifact(model, self.tokenizer, self.config, uri, self.config.data.max_seq_len, extra_files)
