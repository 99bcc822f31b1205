"""Encoder pretraining: tokenizer, MLM stages 1-3, RetroMAE on text and tables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from granite_ray.config.sections import DataConfig, ModelConfig, StageConfig, TableSourcesConfig, TokenizerConfig, TrainConfig


class PretrainMLMConfig(StageConfig):
    """Encoder pretraining (paper section 2.3): stage 1 MLM, stage 2 context extension, stage 3 LR decay.

    All three share the objective; they differ in context length, RoPE thetas and schedule.
    """

    stage: Literal["pretrain-mlm", "extend-context", "decay-lr"] = "pretrain-mlm"
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _continues_from_an_artifact(self) -> "PretrainMLMConfig":
        if self.stage != "pretrain-mlm" and not self.model.init_from:
            raise ValueError(f"model.init_from: stage {self.stage} continues from the previous stage's artifact URI")
        if self.data.max_seq_len > self.model.max_position_embeddings:
            raise ValueError("data.max_seq_len: longer than model.max_position_embeddings")
        return self


class RetroMAEConfig(StageConfig):
    """Stages 4-5: RetroMAE (Xiao et al. 2022) on text, or on tables with their LLM summaries."""

    stage: Literal["retromae", "tabular-retromae"] = "retromae"
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig, description="text (stage 4; the replay in stage 5)")
    tables: TableSourcesConfig | None = None
    decoder_mask_probability: float = Field(0.5, gt=0, lt=1, description="share of positions hidden from each decoder row")
    decoder_targets: Literal["all", "masked"] | None = Field(None, description=(
        "all: enhanced decoding, every target token rebuilt, each from its own sample of the others (RetroMAE); "
        "masked: one mask per target, only the hidden positions rebuilt (R2 section 3.2's masked summary positions); "
        "None: masked for tabular-retromae, all for retromae"))
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _sources(self) -> "RetroMAEConfig":
        if self.decoder_targets is None:
            self.decoder_targets = "masked" if self.stage == "tabular-retromae" else "all"
        if not self.model.init_from:
            raise ValueError("model.init_from: RetroMAE continues from an encoder artifact")
        if self.stage == "tabular-retromae":
            if not self.tables or not (self.tables.summaries or self.tables.tables):
                raise ValueError("tables: tabular-retromae needs tables.summaries and/or tables.tables")
            if self.train.data_sharding == "stride":
                raise ValueError("train.data_sharding: stride reads one ordered dataset; a mixture of sources needs split")
            if self.tables.attention == "m1" and self.model.attn_implementation == "flash_attention_2":
                raise ValueError("model.attn_implementation: flash-attn takes no table mask; use sdpa_varlen (or auto) "
                                 "with tables.attention=m1")
        elif not self.data.paths:
            raise ValueError("data.paths: retromae needs a text corpus")
        if self.data.max_seq_len > self.model.max_position_embeddings:
            raise ValueError("data.max_seq_len: longer than model.max_position_embeddings")
        return self


class TrainTokenizerConfig(StageConfig):
    stage: Literal["train-tokenizer"] = "train-tokenizer"
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
