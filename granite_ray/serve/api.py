"""The HTTP API: OpenAI embeddings, TEI embed / embed_sparse / rerank, Cohere/Jina rerank, health, models.

Every error a client can cause is answered with a 4xx and OpenAI's error body naming the field; the
request never reaches a model replica unless it is well formed, and a replica's own refusals (too many
tokens, bad token ids) come back the same way. With an API key configured, every route but /health
needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
import uuid

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from starlette.exceptions import HTTPException

from granite_ray.config import ServeConfig
from granite_ray.serve.errors import InputError, error_body
from granite_ray.serve.schemas import OpenAIEmbeddingRequest, RerankRequest, TEIEmbedRequest, TEIRerankRequest, TEISparseRequest

REPLICA_RETRIES = 3  # a call whose replica died mid-request goes to another replica (inference is idempotent)
HEALTH_TIMEOUT_S = 10.0


class Model:
    """A served model: its public name and its deployment's handle."""

    def __init__(self, name: str, kind: str, handle, timeout_s: float | None = None) -> None:
        self.name, self.kind, self.handle, self.timeout_s = name, kind, handle, timeout_s

    async def call(self, method: str, *args, **kwargs):
        for attempt in range(REPLICA_RETRIES + 1):
            try:
                result = await asyncio.wait_for(getattr(self.handle, method).remote(*args, **kwargs), self.timeout_s)
            except asyncio.TimeoutError:
                raise InputError(f"{self.name} did not answer within {self.timeout_s:g} s (request_timeout_s)",
                                 code="timeout", status=504) from None
            except (RayActorError, ReplicaUnavailableError):
                if attempt == REPLICA_RETRIES:
                    raise
                await asyncio.sleep(0.1 * 2 ** attempt)
                continue
            if isinstance(result, InputError):  # the replica refused the request (see deployments.refusals_returned)
                raise result
            return result


class Api:
    def __init__(self, config: ServeConfig, api_key: str | None, embedder: Model | None = None,
                 sparse: Model | None = None, reranker: Model | None = None) -> None:
        self.config = config
        self.api_key = api_key
        self.models = {"embedding": embedder, "sparse-embedding": sparse, "rerank": reranker}
        self.created = int(time.time())

    def app(self) -> FastAPI:
        # With a key, the schema is behind it too (it lists every route) and the browser docs are off.
        keyed = dict(docs_url=None, redoc_url=None, openapi_url=None) if self.api_key else {}
        app = FastAPI(title="granite-ray", description=__doc__.splitlines()[0], **keyed)
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_exception_handler(HTTPException, _http_error)
        app.add_exception_handler(InputError, _input_error)
        app.add_exception_handler(RayActorError, _unavailable)
        app.add_exception_handler(ReplicaUnavailableError, _unavailable)
        app.add_exception_handler(Exception, _server_error)
        app.middleware("http")(self.limit_body)
        public = APIRouter()
        public.add_api_route("/health", self.health, methods=["GET"])
        protected = APIRouter(dependencies=[Depends(self.authorize)] if self.api_key else [])
        protected.add_api_route("/v1/models", self.list_models, methods=["GET"])
        protected.add_api_route("/v1/embeddings", self.openai_embeddings, methods=["POST"])
        protected.add_api_route("/embed", self.tei_embed, methods=["POST"])
        protected.add_api_route("/embed_sparse", self.tei_embed_sparse, methods=["POST"])
        protected.add_api_route("/v1/rerank", self.rerank, methods=["POST"])
        protected.add_api_route("/rerank", self.tei_rerank, methods=["POST"])
        if self.api_key:
            protected.add_api_route("/openapi.json", lambda: JSONResponse(app.openapi()), methods=["GET"],
                                    include_in_schema=False)
        app.include_router(public)
        app.include_router(protected)
        return app

    async def limit_body(self, request: Request, call_next):
        """Bodies over max_request_bytes are refused unread, by their Content-Length; a POST without one (a
        chunked upload of unknown size) is refused too (411): every JSON client sends it."""
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if request.method == "POST" and not (declared and declared.isdigit()):
            return JSONResponse(error_body("send the body with a Content-Length header", code="length_required"),
                                status_code=411)
        if declared and declared.isdigit() and int(declared) > limit:
            return JSONResponse(error_body(f"request body over this server's limit of {limit} bytes (max_request_bytes)",
                                           code="request_too_large"), status_code=413)
        return await call_next(request)

    async def authorize(self, credentials: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False))):
        if credentials is None:
            raise HTTPException(401, "missing API key: send the header Authorization: Bearer <key>")
        if not hmac.compare_digest(credentials.credentials.encode(), self.api_key.encode()):
            raise HTTPException(401, "incorrect API key")

    # -- routes ------------------------------------------------------------------------------------
    async def health(self) -> JSONResponse:
        """200 when every model deployment answers, else 503 naming the ones that do not."""
        served = [m for m in self.models.values() if m]
        answers = await asyncio.gather(*(asyncio.wait_for(m.call("describe"), HEALTH_TIMEOUT_S) for m in served),
                                       return_exceptions=True)
        failing = [m.name for m, a in zip(served, answers) if isinstance(a, BaseException)]
        if failing:
            return JSONResponse(error_body(f"not answering: {', '.join(failing)}", "server_error",
                                           code="unavailable"), status_code=503)
        return JSONResponse({"status": "ok", "models": {m.name: {"type": m.kind, **a} for m, a in zip(served, answers)}})

    async def list_models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": m.name, "object": "model", "created": self.created, "owned_by": "granite-ray", "type": kind}
            for kind, m in self.models.items() if m]})

    async def openai_embeddings(self, body: OpenAIEmbeddingRequest) -> JSONResponse:
        model = self._model("embedding", body.model)
        self._check_count(body.input, "input")
        vectors, tokens = await model.call("embed", body.input, "input", body.truncate, body.long_documents,
                                           body.prompt_name, None, body.dimensions)
        if body.encoding_format == "base64":
            encoded = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            encoded = vectors.tolist()
        return JSONResponse({"object": "list", "model": model.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                      "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]})

    async def tei_embed(self, body: TEIEmbedRequest) -> JSONResponse:
        model = self._model("embedding", None)
        self._check_count(body.inputs, "inputs")
        vectors, _ = await model.call("embed", body.inputs, "inputs", body.truncate, body.long_documents,
                                      body.prompt_name, body.normalize, body.dimensions)
        return JSONResponse(vectors.tolist())

    async def tei_embed_sparse(self, body: TEISparseRequest) -> JSONResponse:
        model = self._model("sparse-embedding", None)
        self._check_count(body.inputs, "inputs")
        rows, _ = await model.call("embed_sparse", body.inputs, "inputs", body.truncate, body.long_documents,
                                   body.prompt_name)
        return JSONResponse([[{"index": int(t), "value": float(w)} for t, w in zip(terms, weights)] for terms, weights in rows])

    async def rerank(self, body: RerankRequest) -> JSONResponse:
        model = self._model("rerank", body.model)
        self._check_count(body.documents, "documents")
        if body.top_n is not None and body.top_n > self.config.max_inputs_per_request:
            raise InputError(f"top_n: {body.top_n} is more than this server's limit of "
                             f"{self.config.max_inputs_per_request} documents", param="top_n")
        logits, tokens = await model.call("score", body.query, body.documents, "documents", body.truncate)
        scores = _sigmoid(logits)
        order = np.argsort(-scores, kind="stable")[:body.top_n]
        results = [{"index": int(i), "relevance_score": float(scores[i])} for i in order]
        if body.return_documents:
            for result in results:
                result["document"] = {"text": body.documents[result["index"]]}
        return JSONResponse({"id": str(uuid.uuid4()), "model": model.name, "results": results,
                      "usage": {"total_tokens": tokens}, "meta": {"billed_units": {"search_units": 1}}})

    async def tei_rerank(self, body: TEIRerankRequest) -> JSONResponse:
        model = self._model("rerank", None)
        self._check_count(body.texts, "texts")
        logits, _ = await model.call("score", body.query, body.texts, "texts", body.truncate)
        scores = logits if body.raw_scores else _sigmoid(logits)
        results = [{"index": int(i), "score": float(scores[i])} for i in np.argsort(-scores, kind="stable")]
        if body.return_text:
            for result in results:
                result["text"] = body.texts[result["index"]]
        return JSONResponse(results)

    # -- checks ------------------------------------------------------------------------------------
    def _model(self, kind: str, requested: str | None) -> Model:
        model = self.models[kind]
        if model is None:
            raise InputError(f"this server has no {kind} model", param="model", code="model_not_found", status=404)
        if requested is not None and requested != model.name:
            raise InputError(f"model {requested!r} is not served here; the {kind} model is {model.name!r}",
                             param="model", code="model_not_found", status=404)
        return model

    def _check_count(self, inputs: list, field: str) -> None:
        if len(inputs) > self.config.max_inputs_per_request:
            raise InputError(f"{field}: {len(inputs)} items, more than this server's limit of "
                             f"{self.config.max_inputs_per_request} per request", param=field, code="too_many_inputs")


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    """CrossEncoder's default activation for one label: relevance scores in (0, 1)."""
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


# -- errors ------------------------------------------------------------------------------------------
def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "not JSON")
        return JSONResponse(error_body(f"invalid JSON body: {reason}", code="invalid_json"), status_code=400)
    location = [str(part) for part in first["loc"] if part != "body"]
    field = ".".join(location) or None
    message = first["msg"].removeprefix("Value error, ")
    if "input" in first and not isinstance(first["input"], (dict, list)):
        message += f" (got {first['input']!r})"
    return JSONResponse(error_body(f"{field}: {message}" if field else message, param=location[0] if location else None,
                                   code=first["type"]), status_code=400)


def _input_error(_: Request, error: InputError) -> JSONResponse:
    return JSONResponse(error_body(error.message, param=error.param, code=error.code), status_code=error.status)


def _http_error(_: Request, error: HTTPException) -> JSONResponse:
    codes = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed"}
    headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else None
    return JSONResponse(error_body(str(error.detail), code=codes.get(error.status_code)),
                        status_code=error.status_code, headers=headers)


def _unavailable(_: Request, error: Exception) -> JSONResponse:
    return JSONResponse(error_body("no model replica could take the request; retry shortly", "server_error",
                                   code="unavailable"), status_code=503)


def _server_error(_: Request, error: Exception) -> JSONResponse:
    return JSONResponse(error_body(f"internal error: {type(error).__name__}", "server_error", code="internal_error"),
                        status_code=500)
