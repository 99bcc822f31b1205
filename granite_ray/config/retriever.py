"""The pair-row stages: contrastive, teacher, distillation, reranker, sparse."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from granite_ray.config.base import Section
from granite_ray.config.sections import EncoderInitConfig, PairDataConfig, PassageConfig, StageConfig, TrainConfig


class RetrieverStageConfig(StageConfig):
    """Shared by the embedding stages: an encoder to start from, pair data and the training loop."""

    model: EncoderInitConfig
    data: PairDataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    temperature: float = Field(0.02, gt=0, description="similarities are cosines divided by this")

    @model_validator(mode="after")
    def _equal_batches(self) -> "RetrieverStageConfig":
        if len(self.data.datasets) > 1 and self.train.data_sharding == "stride":
            raise ValueError("train.data_sharding: stride reads one ordered dataset; a mixture of datasets needs split")
        if "drop_last" in self.train.model_fields_set and not self.train.drop_last:
            raise ValueError("train.drop_last: the embedding stages need it true (gathered embeddings need every "
                             "worker's batch to have one shape)")
        self.train.drop_last = True  # gathered embeddings need every worker's batch to have one shape
        return self


class ContrastiveConfig(RetrieverStageConfig):
    """Stage 6: GTE improved contrastive loss, in-batch negatives gathered across workers (Li et al. 2023)."""

    stage: Literal["contrastive"] = "contrastive"
    query_query: bool = Field(False, description="other queries as negatives of a query")
    doc_query: bool = Field(False, description="other queries as negatives of a positive")
    doc_doc: bool = Field(False, description="other passages as negatives of a positive")
    gather_across_workers: bool = Field(True, description="in-batch negatives from every worker's batch")
    mask_duplicate_positives: bool = Field(True, description="an in-batch copy of a query's positive is not its negative")
    grad_cache_chunk: int | None = Field(None, gt=0, description="GradCache: texts encoded per chunk; None: one pass")

    @model_validator(mode="after")
    def _grad_cache_strategy(self) -> "ContrastiveConfig":
        if self.grad_cache_chunk and self.train.sharding == "deepspeed":
            raise ValueError("grad_cache_chunk: runs several backward passes per step; use train.sharding ddp or fsdp2")
        return self


class LoraSettings(Section):
    """LoRA adapters (Hu et al. 2021) through peft, folded into the weights when the artifact is written."""

    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | str = Field("all-linear", description="peft's names: all-linear, or e.g. [q_proj, v_proj]")


class TrainTeacherConfig(ContrastiveConfig):
    """R2 section 3.3: a decoder LLM trained as the embedder that teaches (e5-mistral's recipe): the task
    instruction on queries, EOS appended to every text, its last-layer vector the embedding, GTE's loss with
    in-batch negatives and optional hard negatives; LoRA or full weights."""

    stage: Literal["train-teacher"] = "train-teacher"
    task: str = "Given a web search query, retrieve relevant passages that answer the query"
    query_template: str = Field("Instruct: {task}\nQuery: {query}", description="what teacher-scores sends; ends with {query}")
    lora: LoraSettings | None = Field(default_factory=LoraSettings, description="None: train every weight")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (a 7B model on GPUs)")

    @model_validator(mode="after")
    def _query_prompt_from_template(self) -> "TrainTeacherConfig":
        if not self.query_template.endswith("{query}"):
            raise ValueError("query_template: must end with {query} (the instruction is the query's prefix)")
        if self.data.query_prompt is None:
            self.data.query_prompt = self.query_template.removesuffix("{query}").format(task=self.task)
        if self.grad_cache_chunk and self.gradient_checkpointing:
            raise ValueError("grad_cache_chunk and gradient_checkpointing: choose one way to save activation memory")
        return self


class DistillConfig(RetrieverStageConfig):
    """Stages 7-8: contrastive distillation from teacher scores, on passages or on conversations."""

    stage: Literal["distill", "adapt-conversations"] = "distill"
    data: PairDataConfig
    teacher_temperature: float | None = Field(None, gt=0, description="None: the student's temperature")
    in_batch_weight: float = Field(1.0, ge=0, description=(
        "weight of the contrastive loss over every passage of the batch, added to the distillation (R1's partition "
        "holds the batch's passages; FlagEmbedding's kl_div adds it at 1); 0: each row's own candidates only, which "
        "lowered fetaqa's NDCG@10 by 0.021 with all-mpnet-base-v2 teaching, against 0.002 with it"))

    @model_validator(mode="after")
    def _needs_negatives(self) -> "DistillConfig":
        if self.data.negatives < 1:
            raise ValueError("data.negatives: distillation ranks the positive among hard negatives; give at least 1")
        return self


class RerankerConfig(StageConfig):
    """Cross-encoder reranker: "[CLS] query [SEP] passage" -> a score from a head on CLS, PListMLE over
    each query's positive and mined negatives in teacher-score order (Granite R2, section 4)."""

    stage: Literal["train-reranker"] = "train-reranker"
    model: EncoderInitConfig
    data: PairDataConfig
    max_length: int = Field(512, gt=8, description="tokens of a query-passage pair")
    passages: PassageConfig | None = Field(
        None, description="long documents: each candidate becomes its best-matching window (per_document is 1 here); None: its beginning")
    ranked_positions: int | None = Field(None, gt=0, description=(
        "list positions whose order PListMLE learns (None: all, the paper); 1: only that the positive comes first, for "
        "negatives whose teacher order means nothing to the reranker (a teacher that saw other text than the pairs hold)"))
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _lists(self) -> "RerankerConfig":
        if self.data.negatives < 1:
            raise ValueError("data.negatives: a ranked list needs mined negatives (the paper uses 8)")
        if self.ranked_positions is not None and self.ranked_positions > self.data.negatives + 1:
            raise ValueError(f"ranked_positions {self.ranked_positions}: a list holds {self.data.negatives + 1} candidates")
        return self


class SparseConfig(DistillConfig):
    """SPLADE sparse encoder (Granite R1, section 6): max-pooled log(1 + relu(MLM logits)) term weights,
    distilled from a dense teacher's scores, with FLOPS and NORM regularizers on queries and passages."""

    stage: Literal["train-sparse"] = "train-sparse"  # type: ignore[assignment]
    temperature: float = Field(1.0, gt=0, description="student scores are sparse dot products divided by this")
    teacher_temperature: float | None = Field(0.05, gt=0, description="teacher scores (dense cosines) divided by this")
    in_batch_weight: float = Field(
        1.0, ge=0, description="weight of InfoNCE over every passage of the batch (the other rows' too); 0: distillation only")
    query_flops_weight: float = Field(5e-4, ge=0, description="lambda_q of the FLOPS regularizer")
    passage_flops_weight: float = Field(3e-4, ge=0, description="lambda_p of the FLOPS regularizer")
    query_norm_weight: float = Field(1e-4, ge=0, description="sigma_q of the NORM (L1) regularizer")
    passage_norm_weight: float = Field(1e-4, ge=0, description="sigma_p of the NORM (L1) regularizer")
    regularizer_warmup_steps: int = Field(100, ge=0, description="regularizer weights grow as (step / this)^2 up to 1")
    new_head_terms_per_token: float = Field(
        3.0, gt=0, description="init without an MLM head: the new head's bias lets a token of the first training rows activate about this many terms")
