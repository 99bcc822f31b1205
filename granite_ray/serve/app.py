"""The Serve application: a FastAPI gateway in front of the model deployments the config names.

`build_app(args)` is the builder `serve run` / `serve deploy` import (cluster/serve.yaml passes the
ServeConfig fields as `args`); `run_serve(config)` is `granite-ray serve`: Serve on host:port (loopback
unless told otherwise) until interrupted.
"""

from __future__ import annotations

import os
import signal
import time

import ray
from ray import serve
from ray.serve import Application

from granite_ray.config import API_KEY_ENV, ConfigError, ServeConfig, ServeReplicaConfig, split_label
from granite_ray.runtime import init_ray, log
from granite_ray.serve.api import Api, Model
from granite_ray.serve.deployments import Embedder, Reranker, SparseEncoder


@serve.deployment
@serve.ingress()
class Gateway:
    def __init__(self, config: ServeConfig, api_key: str | None, names: dict[str, str], embedder=None,
                 sparse=None, reranker=None) -> None:
        def model(kind: str, handle) -> Model | None:
            return Model(names[kind], kind, handle, config.request_timeout_s) if handle is not None else None

        self.api = Api(config, api_key, model("embedding", embedder), model("sparse-embedding", sparse),
                       model("rerank", reranker))

    def __serve_build_asgi_app__(self):
        return self.api.app()


def deployment_options(replicas: ServeReplicaConfig) -> dict:
    return {"autoscaling_config": {"min_replicas": replicas.min_replicas, "max_replicas": replicas.max_replicas,
                                   "target_ongoing_requests": replicas.target_ongoing_requests},
            "max_ongoing_requests": replicas.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": replicas.num_cpus, "num_gpus": replicas.num_gpus}}


def build_app(args: dict | ServeConfig) -> Application:
    """The gateway bound to one deployment per configured model; args are ServeConfig fields."""
    config = args if isinstance(args, ServeConfig) else ServeConfig.model_validate({"stage": "serve", **args})
    names, bound = {}, {}
    for kind, field, deployment in (("embedding", "embedder", Embedder), ("sparse-embedding", "sparse", SparseEncoder),
                                    ("rerank", "reranker", Reranker)):
        if entry := getattr(config, field):
            names[kind], uri = split_label(entry)
            replicas = getattr(config, f"{field}_replicas")
            bound[field] = deployment.options(**deployment_options(replicas)).bind(
                uri, config, replicas.threads, replicas.calls_in_flight)
    api_key = serve_api_key(config)
    return Gateway.options(**deployment_options(config.gateway_replicas)).bind(config, api_key, names, **bound)


def serve_api_key(config: ServeConfig) -> str | None:
    return (config.api_key.get_secret_value() if config.api_key else os.environ.get(API_KEY_ENV)) or None


def check_exposure(config: ServeConfig) -> None:
    """An API on other interfaces than loopback answers anyone who reaches it: only with a key, or when told."""
    loopback = config.host in ("localhost", "::1") or config.host.startswith("127.")
    if not loopback and not serve_api_key(config) and not config.allow_anonymous:
        raise ConfigError(f"host {config.host} serves every interface without an API key: set api_key (or "
                          f"{API_KEY_ENV}), or allow_anonymous=true behind a gateway that authenticates")


def run_serve(config: ServeConfig) -> str:
    """Serve until SIGINT or SIGTERM, then shut Serve down; returns the URL it served at."""
    check_exposure(config)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    init_ray(config)
    serve.start(http_options={"host": config.host, "port": config.port})
    url = f"http://{config.host}:{config.port}"
    try:
        serve.run(build_app(config), name=config.app_name, route_prefix="/")
        metrics_ports = sorted({node["MetricsExportPort"] for node in ray.nodes() if node["Alive"]})
        log(f"serving at {url} (Prometheus metrics on each Ray node's port {', '.join(map(str, metrics_ports))})")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("shutting down")
    finally:
        serve.shutdown()
    return url
