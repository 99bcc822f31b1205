"""The stage registry: each stage's config model, training objective and entry function."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from granite_ray.config import (
    ContrastiveConfig,
    DistillConfig,
    EvalConfig,
    MergeConfig,
    MineNegativesConfig,
    PretrainMLMConfig,
    RerankerConfig,
    RetroMAEConfig,
    ServeConfig,
    SparseConfig,
    SpeedConfig,
    SplitQueriesConfig,
    StageConfig,
    SummarizeTablesConfig,
    TeacherScoresConfig,
    TrainTeacherConfig,
    TrainTokenizerConfig,
)
from granite_ray.objectives.mlm import MLMObjective
from granite_ray.objectives.reranker import RerankerObjective
from granite_ray.objectives.retriever import ContrastiveObjective, DistillObjective
from granite_ray.objectives.retromae import RetroMAEObjective
from granite_ray.objectives.sparse import SparseObjective
from granite_ray.objectives.teacher import TeacherObjective


@dataclass(frozen=True)
class Stage:
    config_cls: type[StageConfig]
    entry: str  # "module:function", imported when the stage runs (evaluation pulls in mteb, vLLM jobs vllm)
    objective_cls: type | None = None
    help: str = ""

    def run(self, config: StageConfig) -> str:
        module, name = self.entry.split(":")
        run: Callable[[StageConfig], str] = getattr(importlib.import_module(module), name)
        return run(config)


STAGES: dict[str, Stage] = {
    "train-tokenizer": Stage(TrainTokenizerConfig, "granite_ray.stages.pretrain:run_train_tokenizer",
                             help="train a BPE tokenizer on a streamed corpus"),
    "pretrain-mlm": Stage(PretrainMLMConfig, "granite_ray.stages.pretrain:run_pretrain_mlm", MLMObjective,
                          help="stage 1: masked-LM pretraining"),
    "extend-context": Stage(PretrainMLMConfig, "granite_ray.stages.pretrain:run_pretrain_mlm", MLMObjective,
                            help="stage 2: MLM at long context with a larger global RoPE theta, constant LR"),
    "decay-lr": Stage(PretrainMLMConfig, "granite_ray.stages.pretrain:run_pretrain_mlm", MLMObjective,
                      help="stage 3: MLM with a 1-sqrt LR decay"),
    "retromae": Stage(RetroMAEConfig, "granite_ray.stages.retromae:run_retromae", RetroMAEObjective,
                      help="stage 4: RetroMAE, encoder MLM + a one-layer decoder rebuilding the text from CLS"),
    "tabular-retromae": Stage(RetroMAEConfig, "granite_ray.stages.retromae:run_retromae", RetroMAEObjective,
                              help="stage 5: RetroMAE on tables; the decoder rebuilds the table's LLM summary"),
    "contrastive": Stage(ContrastiveConfig, "granite_ray.stages.retriever:run_embedding_stage", ContrastiveObjective,
                         help="stage 6: GTE improved contrastive loss, negatives gathered across workers, GradCache"),
    "distill": Stage(DistillConfig, "granite_ray.stages.retriever:run_embedding_stage", DistillObjective,
                     help="stage 7: contrastive distillation from teacher scores over mined candidates"),
    "adapt-conversations": Stage(DistillConfig, "granite_ray.stages.retriever:run_embedding_stage", DistillObjective,
                                 help="stage 8: distillation on multi-turn conversations (most recent turn first)"),
    "train-teacher": Stage(TrainTeacherConfig, "granite_ray.stages.retriever:run_embedding_stage", TeacherObjective,
                           help="the teacher (R2 3.3): a decoder LLM as embedder, instruction + EOS + last-token pooling, LoRA"),
    "train-reranker": Stage(RerankerConfig, "granite_ray.stages.retriever:run_embedding_stage", RerankerObjective,
                            help="cross-encoder reranker: PListMLE over the positive and mined negatives in teacher order"),
    "train-sparse": Stage(SparseConfig, "granite_ray.stages.retriever:run_embedding_stage", SparseObjective,
                          help="SPLADE sparse encoder: distillation from dense teacher scores + FLOPS and NORM regularizers"),
    "eval": Stage(EvalConfig, "granite_ray.evaluate.run:run_eval",
                  help="retrieval evaluation on BEIR folders (local or s3://) and mteb tasks"),
    "summarize-tables": Stage(SummarizeTablesConfig, "granite_ray.stages.datajobs:run_summarize_tables",
                              help="table summaries and metadata by an instruct LLM in vLLM actors"),
    "teacher-scores": Stage(TeacherScoresConfig, "granite_ray.stages.datajobs:run_teacher_scores",
                            help="teacher similarities for query/candidate rows by a vLLM pooling model"),
    "mine-negatives": Stage(MineNegativesConfig, "granite_ray.stages.mining:run_mine_negatives",
                            help="hard negatives from an embedder's top-k with a false-negative margin (faiss)"),
    "split-queries": Stage(SplitQueriesConfig, "granite_ray.stages.splits:run_split_queries",
                           help="a BEIR folder's judged queries split into train/dev/test by a seeded hash (disjoint)"),
    "merge": Stage(MergeConfig, "granite_ray.stages.merge:run_merge",
                   help="weighted average of checkpoints of one architecture (LM-Cocktail), as a new artifact"),
    "speed": Stage(SpeedConfig, "granite_ray.stages.speed:run_speed",
                   help="encoding speed by the paper's method: 512-token chunks, 100 overlap, batch 128"),
    "serve": Stage(ServeConfig, "granite_ray.serve.app:run_serve",
                   help="embedder, reranker and sparse encoder behind an OpenAI/TEI/Cohere-compatible HTTP API (Ray Serve)"),
}

