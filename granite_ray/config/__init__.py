"""One config system for every stage: pydantic models, loaded from YAML, overridden from the CLI.

A stage's config is a `StageConfig` subclass. `load_config(cls, yaml_path, overrides)` merges the YAML
file with `key.sub=value` overrides (values parsed as YAML scalars) and validates the result; any error
names the offending field. `base` holds what every section shares, `sections` the sections stages share
(model, data, train, encoder...), `loader` the loading; then one module per stage family: `pretrain`,
`retriever`, `datajobs`, `evaluate`, `serve`, `pipeline`. Every public name is importable from here.
"""

from granite_ray.config.base import ConfigError, Section, absolute_uri, labelled_absolute, split_label
from granite_ray.config.datajobs import (
    MergeConfig,
    MineNegativesConfig,
    SplitQueriesConfig,
    SummarizeTablesConfig,
    TeacherScoresConfig,
)
from granite_ray.config.evaluate import EvalConfig, SpeedConfig
from granite_ray.config.loader import apply_overrides, dump_config, load_config, read_yaml
from granite_ray.config.pipeline import FORWARDED_ENV, JOB_EXCLUDES, REFERENCE, PipelineConfig, PipelineStage
from granite_ray.config.pretrain import PretrainMLMConfig, RetroMAEConfig, TrainTokenizerConfig
from granite_ray.config.retriever import (
    ContrastiveConfig,
    DistillConfig,
    LoraSettings,
    RerankerConfig,
    RetrieverStageConfig,
    SparseConfig,
    TrainTeacherConfig,
)
from granite_ray.config.sections import (
    MODEL_PRESETS,
    DataConfig,
    EncoderConfig,
    EncoderInitConfig,
    EncoderPoolFields,
    LLMConfig,
    ModelConfig,
    PairDataConfig,
    PassageConfig,
    StageConfig,
    TablesConfig,
    TableSourcesConfig,
    TokenizerConfig,
    TrainConfig,
)
from granite_ray.config.serve import API_KEY_ENV, GATEWAY_REPLICAS, ServeConfig, ServeReplicaConfig

__all__ = [
    "ConfigError", "Section", "absolute_uri", "split_label", "labelled_absolute", "MODEL_PRESETS", "ModelConfig",
    "TokenizerConfig", "DataConfig", "TrainConfig", "EncoderConfig", "EncoderPoolFields", "StageConfig",
    "PassageConfig", "LLMConfig", "TablesConfig", "EncoderInitConfig", "PairDataConfig", "TableSourcesConfig",
    "apply_overrides", "read_yaml", "load_config", "dump_config", "PretrainMLMConfig", "RetroMAEConfig",
    "TrainTokenizerConfig", "RetrieverStageConfig", "ContrastiveConfig", "LoraSettings", "TrainTeacherConfig",
    "DistillConfig", "RerankerConfig", "SparseConfig", "SummarizeTablesConfig", "TeacherScoresConfig",
    "MineNegativesConfig", "SplitQueriesConfig", "MergeConfig", "EvalConfig", "SpeedConfig", "ServeReplicaConfig",
    "GATEWAY_REPLICAS", "API_KEY_ENV", "ServeConfig", "REFERENCE", "FORWARDED_ENV", "JOB_EXCLUDES", "PipelineStage",
    "PipelineConfig",
]
