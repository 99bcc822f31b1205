"""The data jobs: table summaries, teacher scores, mined negatives, query splits, merging."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from granite_ray.config.base import absolute_uri
from granite_ray.config.sections import EncoderPoolFields, LLMConfig, PassageConfig, StageConfig, TablesConfig


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
    vector_cache: int = Field(50_000, ge=0, description=(
        "distinct texts whose vectors each teacher actor keeps, least recently used out (a corpus's passages recur as "
        "other queries' negatives); 50k 4096-d vectors take 0.8 GB; 0: none"))
    input_scores_weight: float = Field(0.0, ge=0, lt=1, description=(
        "an ensemble of teachers: input rows that carry an earlier teacher's pos_scores and neg_scores (its "
        "teacher-scores output) keep them at this weight, this teacher's scores get 1 minus it; 0: this teacher alone"))
    scores_scale: Literal["raw", "standardised"] = Field("raw", description=(
        "raw: the teacher's scores as they are (two embedders' cosines averaged as they are); standardised: the "
        "teacher's scores of a row (and the earlier teacher's, when mixed) standardised over the row's candidates: "
        "teachers on different scales, a cross-encoder's logits and an embedder's cosines, mixed as `granite-ray eval` "
        "mixes a reranker with its retriever, or a teacher whose scores have no fixed scale (BM25) set on one before "
        "distillation's teacher temperature"))
    output_uri: str = "outputs/teacher_scores"

    _absolute_input = field_validator("input_uri")(absolute_uri)

    @model_validator(mode="after")
    def _one_scale(self) -> "TeacherScoresConfig":
        if self.input_scores_weight and self.scores_scale == "raw" and self.llm.backend in ("cross-encoder", "bm25"):
            raise ValueError(f"input_scores_weight with a {self.llm.backend} teacher: its scores and the earlier teacher's are "
                             "on different scales; set scores_scale=standardised")
        return self


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
    so one set of judgements can both train and measure (granite_ray.stages.splits)."""

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
