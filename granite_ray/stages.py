"""The stage registry: each stage's config model, training objective and entry function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from granite_ray.config import PretrainMLMConfig, StageConfig, TrainTokenizerConfig
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
}
