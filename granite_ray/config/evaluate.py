"""Evaluation and speed: what `granite-ray eval` and `granite-ray speed` read."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from granite_ray.config.base import absolute_uri, labelled_absolute
from granite_ray.config.sections import EncoderPoolFields, PassageConfig, StageConfig


class EvalConfig(StageConfig, EncoderPoolFields):
    """Retrieval evaluation (`granite-ray eval`): models x BEIR folders and/or mteb tasks."""

    stage: Literal["eval"] = "eval"
    models: list[str] = Field(min_length=1, description="[label=]model folder or s3:// URI (ours, sentence-transformers, HF)")
    datasets: list[str] = Field(default_factory=list, description="BEIR folders, local or s3://")
    mteb_tasks: list[str] = Field(default_factory=list, description="mteb task names (needs the hub)")
    split: str = "test"
    engine: Literal["ray", "mteb"] = Field("ray", description="ray: our streamed encoding and search; mteb: mteb.evaluate")
    top_k: int = Field(100, gt=0)
    reranker: str | None = Field(None, description="cross-encoder folder or s3:// URI: rerank each model's top rerank_top_k")
    rerank_top_k: int = Field(20, gt=0)
    rerank_max_length: int = Field(512, gt=8, description="tokens of a query-passage pair")
    rerank_query_max_length: int | None = Field(64, gt=0, description="query tokens the reranker reads (R2's 64); None: all")
    rerank_passages: PassageConfig | None = Field(None, description="None: the reranker reads each document's beginning")
    reranked_models: list[str] | None = Field(None, description=(
        "labels of the models whose top rerank_top_k the reranker re-scores (those it was trained for); None: every model"))
    rerank_weight: float = Field(1.0, ge=0, le=1, description=(
        "the reranker's share of a reranked document's score, the retriever's the rest (each standardised over the "
        "query's top rerank_top_k); 1: the reranker's order alone"))
    rerank_weight_split: str | None = Field(None, description=(
        "choose rerank_weight on this split's queries (e.g. dev) from 0, 0.1, .. 1 by NDCG@10; never the evaluated split"))
    compare: list[str] | None = Field(None, description=(
        'paired tests "system:baseline" by label ("label + reranker" for a reranked run); None: every model against the '
        "first, and every reranked run against its retriever"))
    significance_trials: int = Field(20_000, gt=0, description="random sign assignments (and bootstrap samples) per paired test")
    output_uri: str = "outputs/eval"

    _absolute_reranker = field_validator("reranker")(absolute_uri)

    @model_validator(mode="after")
    def _has_work(self) -> "EvalConfig":
        if not self.datasets and not self.mteb_tasks:
            raise ValueError("datasets: give at least one BEIR folder (or mteb_tasks)")
        if self.rerank_weight_split is not None and not self.reranker:
            raise ValueError("rerank_weight_split: there is no reranker to weigh; set reranker")
        if self.rerank_weight_split == self.split:
            raise ValueError(f"rerank_weight_split: {self.split!r} is the evaluated split; choose the weight on another "
                             "(e.g. dev), never on the queries it is measured on")
        return self

    _absolute_models = field_validator("models")(lambda uris: [labelled_absolute(u) for u in uris])
    _absolute_datasets = field_validator("datasets")(lambda uris: [absolute_uri(u) for u in uris])


class SpeedConfig(StageConfig):
    """Encoding speed by the paper's method (section 5.2): 512-token chunks, 100 overlap, batch 128."""

    stage: Literal["speed"] = "speed"
    models: list[str] = Field(min_length=1)
    corpus: str = Field(description="a BEIR folder or a corpus .jsonl, local or s3://")
    max_docs: int | None = Field(None, gt=0)
    chunk_tokens: int = Field(512, gt=2)
    chunk_overlap: int = Field(100, ge=0)
    batch_size: int = Field(128, gt=0)
    modes: list[Literal["padded", "packed"]] = Field(default_factory=lambda: ["padded", "packed"], min_length=1)
    attn_implementation: Literal["auto", "sdpa_varlen", "sdpa", "eager", "flash_attention_2"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    warmup_batches: int = Field(2, ge=0)
    output_uri: str = "outputs/speed"

    _absolute_lists = field_validator("models")(lambda uris: [absolute_uri(u) for u in uris])
    _absolute_corpus = field_validator("corpus")(absolute_uri)
