"""Cross-encoder scoring for evaluation (and serving): query-passage pairs, padding-free.

Loads our reranker artifacts and any Hugging Face BERT/ModernBERT sequence-classification folder
(local or s3://); pairs are tokenized "[CLS] query [SEP] passage [SEP]", the query cut to
`query_max_length` tokens and the passage to what is left of `max_length`,
sorted by length and scored a token budget at a time in one varlen forward each.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from granite_ray import storage
from granite_ray.inference.encoder import default_token_budget, packed_embeddings
from granite_ray.models.cpu_linear import prepack_linears
from granite_ray.models.modernbert import resolve_attn_implementation
from granite_ray.tokenizer import cut_to_tokens


class Reranker:
    def __init__(self, path: str, max_length: int = 512, token_budget: int | None = None, device: str | None = None,
                 query_max_length: int | None = 64, cpu_linear: str = "auto") -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with storage.local_copy(path) as folder:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), attn_implementation=resolve_attn_implementation("auto"), dtype=torch.float32)
        if model.config.num_labels != 1:
            raise ValueError(f"{path}: a reranker has one output label, this model has {model.config.num_labels}")
        model.to(self.device).eval()
        prepack_linears(model, cpu_linear)
        self.model = CrossEncoderModel(model)
        self.max_length = min(max_length, getattr(model.config, "max_position_embeddings", max_length))
        self.token_budget = token_budget or default_token_budget(self.device)
        self.query_max_length = query_max_length

    @torch.inference_mode()
    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """One relevance logit per (query, passage) pair, in input order."""
        queries = [q for q, _ in pairs]
        if self.query_max_length:  # R2's reranker reads at most 64 query tokens
            offsets = self.tokenizer(queries, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            queries = [cut_to_tokens(q, o, self.query_max_length) for q, o in zip(queries, offsets)]
        encoded = self.tokenizer(queries, [p for _, p in pairs], truncation="only_second", max_length=self.max_length)
        ids = encoded["input_ids"]
        types = encoded.get("token_type_ids")
        out = np.zeros(len(pairs), dtype=np.float32)
        order = np.argsort([-len(s) for s in ids], kind="stable")
        start = 0
        while start < len(order):
            end, used = start, 0
            while end < len(order) and (end == start or used + len(ids[order[end]]) <= self.token_budget):
                used += len(ids[order[end]])
                end += 1
            chunk = order[start:end]
            out[chunk] = self.model([ids[i] for i in chunk], [types[i] for i in chunk] if types else None,
                                    self.device).float().cpu().numpy()
            start = end
        return out


def classification_head(model: nn.Module, cls: torch.Tensor) -> torch.Tensor:
    """The model's own sequence-classification head on CLS vectors (BERT: pooler first)."""
    if hasattr(model, "bert"):
        return model.classifier(model.dropout(model.bert.pooler.activation(model.bert.pooler.dense(cls))))
    if hasattr(model, "head") and hasattr(model, "drop"):  # ModernBERT
        return model.classifier(model.drop(model.head(cls)))
    if hasattr(model, "roberta"):  # RoBERTa / XLM-R: the head reads position 0 of the sequence itself
        return model.classifier(cls[:, None])
    raise ValueError(f"reranker: {type(model).__name__} is not supported (BERT, ModernBERT or XLM-R sequence classification)")



class CrossEncoderModel(nn.Module):
    """Packed forward + head in one module, so DDP/FSDP see every parameter used in forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layer_types = getattr(model.config, "layer_types", None)

    def forward(self, sequences: list[list[int]], token_types: list[list[int]] | None, device: torch.device) -> torch.Tensor:
        cls = packed_embeddings(self.model.base_model, sequences, "cls", self.layer_types, device, token_types)
        return classification_head(self.model, cls).squeeze(-1)

