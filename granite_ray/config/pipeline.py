"""`granite-ray pipeline`: stages as Ray jobs, chained by `${name}` references."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from granite_ray.config.base import ConfigError, Section, absolute_uri
from granite_ray.config.loader import read_yaml

REFERENCE = re.compile(r"\$\{([a-z0-9][a-z0-9_-]*)\}")  # ${name} in a pipeline: a variable or an earlier stage's artifact


FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_EC2_METADATA_DISABLED", "HF_HUB_OFFLINE",
                 "AWS_MAX_ATTEMPTS", "GRANITE_RAY_S3_CONNECT_TIMEOUT", "GRANITE_RAY_S3_REQUEST_TIMEOUT")


JOB_EXCLUDES = (".venv", ".venv-*", ".git", "outputs", "runs", "benchmarks/results", "**/__pycache__", "*.egg-info")  # not uploaded


def with_included(tree: dict[str, Any], seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A pipeline file's tree with its `include`d file's stages first and that file's variables as defaults
    (merged before either file's `${name}`s resolve, so an override of `data` moves `dataset: ${data}/x`)."""
    if not tree.get("include"):
        return tree
    path = absolute_uri(tree["include"])
    if path in seen:
        raise ConfigError(f"include: {path} includes itself through {' -> '.join(seen)}")
    included = with_included(read_yaml(path), (*seen, path))
    return {**tree, "variables": {**(included.get("variables") or {}), **(tree.get("variables") or {})},
            "stages": list(included.get("stages") or []) + list(tree.get("stages") or [])}


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
    include: str | None = Field(None, description="a pipeline file whose stages run first and whose variables are "
                                "defaults here (adapt.yaml and the demo include configs/pipelines/adapt_core.yaml); local or s3://")
    stages: list[PipelineStage] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _included(cls, tree: Any) -> Any:
        return with_included(tree) if isinstance(tree, dict) else tree

    @field_validator("variables", mode="before")
    @classmethod
    def _text(cls, variables: Any) -> Any:
        """`variables.steps=40` parses as a number; a variable is text pasted into overrides."""
        if isinstance(variables, dict):
            return {k: str(v) if isinstance(v, (int, float, bool)) else v for k, v in variables.items()}
        return variables

    _absolute = field_validator("output_uri", "working_dir")(absolute_uri)

    @model_validator(mode="after")
    def _variables_in_variables(self) -> "PipelineConfig":
        """`dataset: ${data}/fetaqa_dev`: a variable may name another, so overriding `data` moves both."""
        for _ in self.variables:
            resolved = {k: REFERENCE.sub(lambda m: self.variables.get(m.group(1), m.group(0)), v)
                        for k, v in self.variables.items()}
            if resolved == self.variables:
                break
            self.variables.update(resolved)  # in place: assigning would validate the model again
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> "PipelineConfig":
        names = [s.name for s in self.stages]
        if repeated := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"stages: names {repeated} repeat")
        if clash := sorted(set(names) & set(self.variables)):
            raise ValueError(f"variables: {clash} are also stage names; ${{name}} would be ambiguous")
        return self
