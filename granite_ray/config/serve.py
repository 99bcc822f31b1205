"""`granite-ray serve`: the deployments, their replicas, the HTTP API's key."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)

from granite_ray.config.base import Section, labelled_absolute
from granite_ray.config.sections import StageConfig


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
    calls_in_flight: int = Field(2, gt=0, description="inference calls a replica runs at once under load, on "
                                 "threads // calls_in_flight threads each (so at most `threads` calls); a batch "
                                 "that is all there is runs alone on every thread")

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
    max_batch_tokens: int | None = Field(
        None, gt=0, description="tokens of the requests batched into one inference call; None: one forward of the "
        "replica's device (4096 tokens on CPU, 16384 on a GPU), so side-by-side calls stay short and share a burst evenly")
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

    _absolute_models = field_validator("embedder", "reranker", "sparse")(lambda uri: uri and labelled_absolute(uri))

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
