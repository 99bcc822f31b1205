"""SPLADE sparse-encoder objective (Granite Embedding R1, section 6).

Inputs per batch: framed token ids of each row's query, positive and `negatives` mined
negatives, with the teacher's scores for those candidates. Each text becomes term weights
w_j = max_i log(1 + relu(MLM logit_ij)); the student scores a candidate by the dot product of
the query's and the candidate's weights. Loss = KL distillation from the dense teacher
+ an in-batch ranking term over every passage of the batch + lambda_q FLOPS(q) + lambda_p FLOPS(p)
+ sigma_q NORM(q) + sigma_p NORM(p), the regularizer weights warming up quadratically (SPLADE) so
the model first learns to rank, then to be sparse.
The artifact is a *ForMaskedLM folder with sentence-transformers' MLMTransformer + SpladePooling
modules: `SparseEncoder(path)` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForMaskedLM

import granite_ray.models.attention  # noqa: F401  (registers sdpa_varlen)
from granite_ray import storage
from granite_ray.config import SparseConfig, split_label
from granite_ray.data.corpus import head_records, resolve_files
from granite_ray.data.pairs import parse_pair
from granite_ray.inference.encoder import packed_splade, sentence_transformers_settings
from granite_ray.losses.distill import distillation_loss
from granite_ray.losses.in_batch import in_batch_ranking_loss
from granite_ray.losses.sparse import flops_regularizer, norm_regularizer
from granite_ray.models.modernbert import resolve_attn_implementation, set_dropout, set_global_rope_theta, write_artifact
from granite_ray.objectives.retriever import pair_rows
from granite_ray.train.metrics import dense_flops_per_token

METRICS = ("distill_loss", "in_batch_loss", "query_flops", "passage_flops", "query_nonzeros", "passage_nonzeros")


class SpladeModel(nn.Module):
    """Packed encoder forward + MLM head + max pooling in one module, so DDP/FSDP see every parameter."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layer_types = getattr(model.config, "layer_types", None)

    def forward(self, sequences: list[list[int]], device: torch.device) -> torch.Tensor:
        return packed_splade(self.model, sequences, self.layer_types, device)


def sparse_encoder_files(vocab_size: int, max_seq_length: int, prompts: dict[str, str]) -> dict[str, bytes]:
    """sentence-transformers' SparseEncoder layout: MLMTransformer on the folder, then SpladePooling."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.sparse_encoder.modules.mlm_transformer.MLMTransformer"},
               {"idx": 1, "name": "1", "path": "1_SpladePooling",
                "type": "sentence_transformers.sparse_encoder.modules.splade_pooling.SpladePooling"}]
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {"transformer_task": "fill-mask", "max_seq_length": max_seq_length,
                                      "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
                                      "module_output_name": "token_embeddings"},
        "1_SpladePooling/config.json": {"pooling_strategy": "max", "activation_function": "relu", "embedding_dimension": vocab_size},
        "config_sentence_transformers.json": {"model_type": "SparseEncoder", "prompts": prompts, "default_prompt_name": None,
                                              "similarity_fn_name": "dot"},
    }
    return {name: json.dumps(content, indent=2).encode() for name, content in files.items()}


def start_missing_head(model: nn.Module, missing_keys: list[str], sample_sequences: Callable[[], list[list[int]]],
                       terms_per_token: float) -> bool:
    """A checkpoint without an MLM head (e.g. a sentence-transformers BERT) gets one whose dense transform
    is the identity and whose decoder is tied to the input embeddings, so each token's logits peak at its
    own and related tokens; the decoder bias is then set so that a token of the sample texts (read only
    then) activates about `terms_per_token` terms. A randomly drawn transform maps every text to the same
    few terms, and with no bias every text activates nearly the whole vocabulary: distillation recovers
    from neither (untrained all-MiniLM-L6-v2 on cranfield: NDCG@10 0.02 with bias 0, 0.24 calibrated).
    Returns whether a head was started."""
    started = False
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(("transform.dense", "head.dense")) and f"{name}.weight" in missing_keys:
            with torch.no_grad():
                module.weight.copy_(torch.eye(module.weight.shape[0], module.weight.shape[1]))
                if module.bias is not None:
                    module.bias.zero_()
            started = True
    if started:
        decoder = model.get_output_embeddings()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            decoder.bias.zero_()
            rank = max(1, round(terms_per_token))
            thresholds = [model(input_ids=torch.tensor([ids])).logits[0].topk(rank + 1, dim=-1).values[:, -1]
                          for ids in sample_sequences()]
            decoder.bias.fill_(-float(torch.cat(thresholds).mean()))
        model.train(was_training)
    return started


class SparseObjective:
    @staticmethod
    def prepare_tokenizer(tokenizer):
        return tokenizer

    @classmethod
    def row_tokenizer(cls, config: SparseConfig, tokenizer) -> tuple[type, tuple]:
        return pair_rows(config, tokenizer, teacher_scores=True)  # distilled from the dense teacher's scores

    def __init__(self, config: SparseConfig, tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.negatives = config.data.negatives
        self.step = 0  # set by the training loop: the regularizer warm-up follows optimizer steps
        self.parts = dict.fromkeys(METRICS, 0.0) | {"count": 0}

    def build_model(self) -> nn.Module:
        attn = resolve_attn_implementation(self.config.model.attn_implementation)
        with storage.local_copy(self.config.model.init_from) as folder:
            self.prompts = sentence_transformers_settings(Path(folder))["prompts"]
            model, loading = AutoModelForMaskedLM.from_pretrained(str(folder), attn_implementation=attn, dtype=torch.float32,
                                                                  output_loading_info=True)
        start_missing_head(model, loading["missing_keys"], self.sample_sequences, self.config.new_head_terms_per_token)
        set_dropout(model, self.config.model.dropout)
        if self.config.model.global_rope_theta:
            set_global_rope_theta(model, self.config.model.global_rope_theta)
        return SpladeModel(model)

    def sample_sequences(self, rows: int = 8) -> list[list[int]]:
        """Queries and positives of the first training rows, cut to the training budgets (no prompts:
        they only set the bias scale)."""
        data = self.config.data
        first_file = resolve_files([split_label(data.datasets[0])[1]], field="data.datasets")[0]
        pairs = [parse_pair(record, 0, False) for record in head_records(first_file, rows)]
        return [self.tokenizer(text, truncation=True, max_length=budget)["input_ids"]
                for pair in pairs for text, budget in ((pair["query"], data.query_max_len), (pair["pos"], data.passage_max_len))]

    def flops_per_token(self, model: nn.Module) -> float:
        return dense_flops_per_token(model)

    def batch_inputs(self, batch: dict[str, np.ndarray], device: torch.device) -> dict:
        rows = len(batch["query"])
        sequences = [list(q) for q in batch["query"]] + [list(p) for p in batch["pos"]]
        sequences += [list(n) for negs in batch["negs"] for n in negs]
        tokens = sum(len(s) for s in sequences)
        return {"sequences": sequences, "rows": rows, "device": device, "_tokens": tokens, "_slots": tokens,
                "teacher": torch.as_tensor(np.stack(batch["scores"]), dtype=torch.float32, device=device)}

    def regularizer_scale(self) -> float:
        warmup = self.config.regularizer_warmup_steps
        return 1.0 if warmup == 0 else min(1.0, (self.step / warmup) ** 2)

    def loss(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        c, rows = self.config, inputs["rows"]
        weights = model(inputs["sequences"], inputs["device"])
        queries, passages = weights[:rows], weights[rows:]
        candidates = torch.cat([passages[:rows, None], passages[rows:].reshape(rows, self.negatives, -1)], dim=1)
        student = torch.einsum("bv,bnv->bn", queries, candidates)
        distill = distillation_loss(student, inputs["teacher"], temperature=c.temperature, teacher_temperature=c.teacher_temperature)
        in_batch = in_batch_ranking_loss(queries, passages, c.temperature) if c.in_batch_weight else torch.zeros(())
        query_flops, passage_flops = flops_regularizer(queries), flops_regularizer(passages)
        regularizers = (c.query_flops_weight * query_flops + c.passage_flops_weight * passage_flops
                        + c.query_norm_weight * norm_regularizer(queries) + c.passage_norm_weight * norm_regularizer(passages))
        for name, value in (("distill_loss", distill), ("in_batch_loss", in_batch),
                            ("query_flops", query_flops), ("passage_flops", passage_flops),
                            ("query_nonzeros", (queries > 0).sum(1).float().mean()),
                            ("passage_nonzeros", (passages > 0).sum(1).float().mean())):
            self.parts[name] += float(value)
        self.parts["count"] += 1
        return distill + c.in_batch_weight * in_batch + self.regularizer_scale() * regularizers

    def pop_metrics(self) -> dict[str, tuple[float, int]]:
        """Sums and counts since the last call, for the loop to average across workers."""
        parts, self.parts = self.parts, dict.fromkeys(METRICS, 0.0) | {"count": 0}
        return {name: (parts[name], parts["count"]) for name in METRICS}

    def save_artifact(self, model: nn.Module, uri: str, extra_files: dict[str, bytes]) -> None:
        files = sparse_encoder_files(model.model.config.vocab_size, self.config.data.passage_max_len,
                                     {"query": self.prompts.get("query", ""), "document": self.prompts.get("document", "")})
        write_artifact(model.model, self.tokenizer, self.config, uri, {**files, **extra_files})
