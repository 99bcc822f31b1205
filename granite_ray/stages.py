"""The stage registry: each stage's config model, training objective and entry function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from granite_ray.config import (EvalConfig, MergeConfig, MineNegativesConfig, PretrainMLMConfig, SpeedConfig, StageConfig,
                                SummarizeTablesConfig, TeacherScoresConfig, TrainTokenizerConfig)
from granite_ray.objectives.mlm import MLMObjective
from granite_ray.pretrain import run_pretrain_mlm, run_train_tokenizer


@dataclass(frozen=True)
class Stage:
    config_cls: type[StageConfig]
    run: Callable[[StageConfig], str]
    objective_cls: type | None = None
    help: str = ""


STAGES: dict[str, Stage] = {
    "train-tokenizer": Stage(TrainTokenizerConfig, run_train_tokenizer, help="train a BPE tokenizer on a streamed corpus"),
    "pretrain-mlm": Stage(PretrainMLMConfig, run_pretrain_mlm, MLMObjective, help="stage 1: masked-LM pretraining"),
    "extend-context": Stage(PretrainMLMConfig, run_pretrain_mlm, MLMObjective,
                            help="stage 2: MLM at long context with a larger global RoPE theta, constant LR"),
    "decay-lr": Stage(PretrainMLMConfig, run_pretrain_mlm, MLMObjective, help="stage 3: MLM with a 1-sqrt LR decay"),
    "eval": Stage(EvalConfig, lambda c: _lazy("granite_ray.evaluate.run", "run_eval")(c),
                  help="retrieval evaluation on BEIR folders (local or s3://) and mteb tasks"),
    "summarize-tables": Stage(SummarizeTablesConfig, lambda c: _lazy("granite_ray.datajobs", "run_summarize_tables")(c),
                              help="table summaries and metadata by an instruct LLM in vLLM actors"),
    "teacher-scores": Stage(TeacherScoresConfig, lambda c: _lazy("granite_ray.datajobs", "run_teacher_scores")(c),
                            help="teacher similarities for query/candidate rows by a vLLM pooling model"),
    "mine-negatives": Stage(MineNegativesConfig, lambda c: _lazy("granite_ray.mining", "run_mine_negatives")(c),
                            help="hard negatives from an embedder's top-k with a false-negative margin (faiss)"),
    "merge": Stage(MergeConfig, lambda c: _lazy("granite_ray.merge", "run_merge")(c),
                   help="weighted average of checkpoints of one architecture (LM-Cocktail), as a new artifact"),
    "speed": Stage(SpeedConfig, lambda c: _lazy("granite_ray.speed", "run_speed")(c),
                   help="encoding speed by the paper's method: 512-token chunks, 100 overlap, batch 128"),
}


def _lazy(module: str, name: str) -> Callable:
    """Evaluation pulls in mteb and datasets: imported only when those commands run."""
    import importlib

    return getattr(importlib.import_module(module), name)
