"""Embedding objectives (stages 6-8): contrastive fine-tuning and contrastive distillation.

Inputs per batch: framed token ids of each row's query, positive and `negatives` hard
negatives (granite_ray.data.pairs), plus teacher scores for distillation. All texts of a batch
are encoded in one padding-free varlen forward and pooled as the model's sentence-transformers
config says. With several workers, the embeddings are gathered (autograd-aware) so every
query sees every worker's passages as negatives; each worker then computes the loss of the
whole global batch, which makes the gradients equal to one worker holding that batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoModel

import granite_ray.models.attention  # noqa: F401  (registers sdpa_varlen)
from granite_ray import storage
from granite_ray.config import ContrastiveConfig, DistillConfig, RetrieverStageConfig
from granite_ray.data.pairs import TokenizePairs
from granite_ray.inference.encoder import packed_embeddings, sentence_transformers_settings, special_frame
from granite_ray.losses.contrastive import improved_contrastive_loss
from granite_ray.losses.distill import distillation_loss
from granite_ray.models.modernbert import (
    resolve_attn_implementation,
    sentence_transformers_files,
    set_dropout,
    set_global_rope_theta,
    write_artifact,
)
from granite_ray.train.metrics import dense_flops_per_token, encoder_flops_per_token


def load_encoder(config: RetrieverStageConfig) -> tuple[torch.nn.Module, dict]:
    """The base encoder (no task head) of `model.init_from` and its sentence-transformers settings."""
    attn = resolve_attn_implementation(config.model.attn_implementation)
    with storage.local_copy(config.model.init_from) as folder:
        settings = sentence_transformers_settings(Path(folder))
        settings["module_files"] = sentence_transformers_module_files(Path(folder))
        model = AutoModel.from_pretrained(str(folder), attn_implementation=attn, dtype=torch.float32)
    if getattr(model, "pooler", None) is not None:  # BERT's pooler is not in the embedding path: frozen, kept as loaded
        model.pooler.requires_grad_(False)
    set_dropout(model, config.model.dropout)
    if config.model.global_rope_theta:
        set_global_rope_theta(model, config.model.global_rope_theta)
    return model, settings


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every worker's rows, stacked in rank order [world, ...]; gradients flow back to each owner."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor[None]
    if not tensor.requires_grad:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)
    return torch.stack(torch.distributed.nn.functional.all_gather(tensor.contiguous()))


def sentence_transformers_module_files(source: Path) -> dict[str, bytes]:
    """The source's pooling/normalize module files (small), kept so the artifact embeds the way the
    source did without fetching the source folder again at save time."""
    if not (source / "modules.json").exists():
        return {}
    names = [n for n in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json") if (source / n).exists()]
    for module in json.loads((source / "modules.json").read_text()):
        if module.get("path") and (source / module["path"]).is_dir():  # Normalize has no folder
            names += [str(f.relative_to(source)) for f in (source / module["path"]).rglob("*") if f.is_file()]
    return {name: (source / name).read_bytes() for name in names}


def pair_rows(config: RetrieverStageConfig, tokenizer, teacher_scores: bool) -> tuple[type, tuple]:
    """The Ray Data actor (and its arguments) that frames each row's query, positive and negatives,
    with the teacher's scores over them when `teacher_scores`."""
    return TokenizePairs, (tokenizer.backend_tokenizer.to_str(), special_frame(tokenizer), config.data.model_dump(),
                           teacher_scores)


class EmbeddingObjective:
    """What the embedding stages share: model, batch layout, one packed forward, artifact.
    Each objective declares what its stage's runner prepares: the tokenizer, and the actor that
    turns raw rows into its batches."""

    teacher_scores = True  # distillation learns the teacher's scores over each row's candidates

    @staticmethod
    def prepare_tokenizer(tokenizer):
        return tokenizer

    @classmethod
    def row_tokenizer(cls, config: RetrieverStageConfig, tokenizer) -> tuple[type, tuple]:
        return pair_rows(config, tokenizer, cls.teacher_scores)

    def __init__(self, config: RetrieverStageConfig, tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.negatives = config.data.negatives

    def build_model(self) -> torch.nn.Module:
        model, settings = load_encoder(self.config)
        self.pooling = settings["pooling"]
        # A plain HF encoder gets our CLS pooling.
        self.module_files = settings["module_files"] or sentence_transformers_files(model.config.hidden_size,
                                                                                    self.config.data.passage_max_len)
        self.layer_types = getattr(model.config, "layer_types", None)
        return model

    def flops_per_token(self, model: torch.nn.Module) -> float:
        cfg = model.config
        if not hasattr(cfg, "layer_types") or not hasattr(cfg, "local_attention"):
            return dense_flops_per_token(model)
        return encoder_flops_per_token(cfg, self.config.data.passage_max_len, predicted_fraction=0.0)

    def batch_inputs(self, batch: dict[str, np.ndarray], device: torch.device) -> dict:
        rows = len(batch["query"])
        sequences = [list(q) for q in batch["query"]] + [list(p) for p in batch["pos"]]
        if self.negatives:
            sequences += [list(n) for negs in batch["negs"] for n in negs]
        tokens = sum(len(s) for s in sequences)
        # A passage's identity is its token ids: in-batch copies of a query's positive are not its negatives.
        # A query's identity too: rows asking the same query (one per judged positive) never negate each other's positives.
        text_ids = torch.tensor([hash(tuple(s)) for s in sequences], dtype=torch.int64, device=device)
        inputs = {"sequences": sequences, "rows": rows, "device": device, "passage_ids": text_ids[rows:], "query_ids": text_ids[:rows],
                  "_tokens": tokens, "_slots": tokens}
        if "scores" in batch:
            inputs["teacher"] = torch.as_tensor(np.stack(batch["scores"]), dtype=torch.float32, device=device)
        return inputs

    def embed(self, model: torch.nn.Module, sequences: list[list[int]], device: torch.device) -> torch.Tensor:
        return packed_embeddings(model, sequences, self.pooling, self.layer_types, device).float()

    def split(self, embeddings: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """[queries; positives; negatives row-major] -> q [B, d], pos [B, d], negs [B, n, d] or None."""
        q, pos = embeddings[:rows], embeddings[rows:2 * rows]
        negs = embeddings[2 * rows:].reshape(rows, self.negatives, -1) if self.negatives else None
        return q, pos, negs

    def loss(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        return self.loss_from_embeddings(self.embed(model, inputs["sequences"], inputs["device"]), inputs)

    def in_batch_loss(self, embeddings: torch.Tensor, inputs: dict, gather_across_workers: bool = True,
                      mask_duplicate_positives: bool = True, **terms: bool) -> torch.Tensor:
        """GTE's improved contrastive loss over the (global) batch: each query's positive against every
        passage of it; `terms` (query_query, doc_query, doc_doc) add the GTE partition's other terms."""
        rows, ids = inputs["rows"], inputs["passage_ids"]
        if gather_across_workers:
            # One collective for all embeddings: per-tensor gathers could run their backward passes
            # in different orders on different workers and mix up their gradients.
            parts = [self.split(block, rows) for block in gather(embeddings)]
            q, pos = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            negs = torch.cat([p[2] for p in parts]) if self.negatives else None
            ids, query_ids = gather(ids), gather(inputs["query_ids"]).reshape(-1)
        else:
            q, pos, negs = self.split(embeddings, rows)
            ids, query_ids = ids[None], inputs["query_ids"]
        pos_ids = ids[:, :rows].reshape(-1)
        neg_ids = ids[:, rows:].reshape(-1, self.negatives) if self.negatives else None
        return improved_contrastive_loss(q, pos, negs, temperature=self.config.temperature, **terms,
                                         doc_ids=(pos_ids, neg_ids, query_ids) if mask_duplicate_positives else None)

    def save_artifact(self, model: torch.nn.Module, uri: str, extra_files: dict[str, bytes]) -> None:
        write_artifact(model, self.tokenizer, self.config, uri, {**self.module_files, **extra_files})


class ContrastiveObjective(EmbeddingObjective):
    config: ContrastiveConfig
    teacher_scores = False

    def loss_from_embeddings(self, embeddings: torch.Tensor, inputs: dict) -> torch.Tensor:
        c = self.config
        return self.in_batch_loss(embeddings, inputs, c.gather_across_workers, c.mask_duplicate_positives,
                                  query_query=c.query_query, doc_query=c.doc_query, doc_doc=c.doc_doc)

    def forward_backward(self, strategy, inputs: dict, scale: float, boundary: bool, autocast) -> torch.Tensor:
        """With grad_cache_chunk (GradCache, Gao et al. 2021): embed all texts without a graph, take the
        loss's gradient with respect to the embeddings, then re-encode chunk by chunk and push that
        gradient through; memory holds one chunk's graph, never the batch's."""
        chunk = self.config.grad_cache_chunk
        if not chunk:
            with strategy.accumulating(boundary), autocast():
                loss = self.loss(strategy.model, inputs) * scale
            strategy.backward(loss, boundary)
            return loss.detach()
        sequences, device = inputs["sequences"], inputs["device"]
        parts = [sequences[i:i + chunk] for i in range(0, len(sequences), chunk)]
        rng_states = []
        with torch.no_grad(), autocast():
            cached = []
            for part in parts:  # the RNG state of each chunk, so dropout repeats in the second pass
                rng_states.append((torch.get_rng_state(), torch.cuda.get_rng_state() if device.type == "cuda" else None))
                cached.append(self.embed(strategy.model, part, device))
        embeddings = torch.cat(cached).requires_grad_()
        with autocast():
            loss = self.loss_from_embeddings(embeddings, inputs) * scale
        loss.backward()
        gradient = embeddings.grad
        start = 0
        for i, (part, (cpu_state, cuda_state)) in enumerate(zip(parts, rng_states)):
            last = i == len(parts) - 1
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state)
            with strategy.accumulating(boundary and last), autocast():
                surrogate = (self.embed(strategy.model, part, device) * gradient[start:start + len(part)]).sum()
            strategy.backward(surrogate, boundary and last)
            start += len(part)
        return loss.detach()


class DistillObjective(EmbeddingObjective):
    config: DistillConfig

    def loss_from_embeddings(self, embeddings: torch.Tensor, inputs: dict) -> torch.Tensor:
        q, pos, negs = self.split(embeddings, inputs["rows"])
        candidates = torch.nn.functional.normalize(torch.cat([pos[:, None], negs], dim=1), dim=-1)
        student = torch.einsum("bd,bnd->bn", torch.nn.functional.normalize(q, dim=-1), candidates)
        c = self.config
        distill = distillation_loss(student, inputs["teacher"], temperature=c.temperature, teacher_temperature=c.teacher_temperature)
        if not c.in_batch_weight:
            return distill
        # FlagEmbedding's kl_div: the teacher's distribution over the row's candidates plus InfoNCE over the whole
        # batch, both at the temperature's own scale (distillation_loss is multiplied by tau^2 to be free of it).
        return distill / c.temperature ** 2 + c.in_batch_weight * self.in_batch_loss(embeddings, inputs)
