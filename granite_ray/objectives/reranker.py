"""Cross-encoder reranker objective: PListMLE over ranked lists (Granite R2 reranker).

Inputs per row: the token ids (and token types, for BERT) of "[CLS] query [SEP] passage [SEP]"
for the positive and each mined negative, listed best first (granite_ray.data.pairs.TokenizeLists).
All pairs of a batch go through one padding-free varlen forward; the sequence-classification
head scores each pair's CLS vector exactly as the model's own forward would, so the artifact
gives the same scores in sentence-transformers' `CrossEncoder`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

import granite_ray.models.attention  # noqa: F401  (registers sdpa_varlen)
from granite_ray import storage
from granite_ray.config import RerankerConfig
from granite_ray.data.pairs import TokenizeLists
from granite_ray.inference.reranker import CrossEncoderModel
from granite_ray.losses.plistmle import plistmle_loss
from granite_ray.models.modernbert import resolve_attn_implementation, set_dropout, write_artifact
from granite_ray.train.metrics import dense_flops_per_token


def load_cross_encoder(config: RerankerConfig) -> nn.Module:
    attn = resolve_attn_implementation(config.model.attn_implementation)
    with storage.local_copy(config.model.init_from) as folder:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1, attn_implementation=attn,
                                                                   dtype=torch.float32)
    set_dropout(model, config.model.dropout)
    return model


class RerankerObjective:
    @staticmethod
    def prepare_tokenizer(tokenizer):
        return tokenizer

    @classmethod
    def row_tokenizer(cls, config: RerankerConfig, tokenizer) -> tuple[type, tuple]:
        """Each row's query paired with its positive and negatives, best first (a ranked list)."""
        return TokenizeLists, (tokenizer.backend_tokenizer.to_str(), config.data.model_dump(), config.max_length,
                               config.passages.model_dump() if config.passages else None)

    def __init__(self, config: RerankerConfig, tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer

    def build_model(self) -> nn.Module:
        return CrossEncoderModel(load_cross_encoder(self.config))

    def flops_per_token(self, model: nn.Module) -> float:
        return dense_flops_per_token(model)

    def batch_inputs(self, batch: dict[str, np.ndarray], device: torch.device) -> dict:
        sequences = [list(pair) for pairs in batch["pairs"] for pair in pairs]
        types = [list(t) for row in batch["types"] for t in row] if "types" in batch else None
        tokens = sum(len(s) for s in sequences)
        return {"sequences": sequences, "types": types, "rows": len(batch["pairs"]), "device": device,
                "_tokens": tokens, "_slots": tokens}

    def loss(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        scores = model(inputs["sequences"], inputs["types"], inputs["device"])
        return plistmle_loss(scores.view(inputs["rows"], -1), self.config.ranked_positions)

    def save_artifact(self, model: nn.Module, uri: str, extra_files: dict[str, bytes]) -> None:
        write_artifact(model.model, self.tokenizer, self.config, uri, extra_files)
