"""Model replicas: a dense embedder, a SPLADE sparse encoder and a cross-encoder reranker.

Each replica loads its model once, from a folder or s3://, and feeds one token-budget batcher: a
request is tokenized on arrival (in a thread, off the event loop), checked against the model's
length limit, and its token sequences join other callers' in one padding-free inference call.

Inputs longer than the model's limit follow the request's choice, else the server's `long_inputs`
policy: truncate (keep the first max_length tokens, special tokens included), refuse (400), or, when
the request asks for `long_documents`, embed overlapping windows and pool them by mean or max.
"""

from __future__ import annotations

import asyncio
import functools
import math

import numpy as np
import ray
import torch
from ray import serve

from granite_ray.config import EncoderConfig, ServeConfig
from granite_ray.inference import reranker
from granite_ray.inference.encoder import Encoder, pool_windows
from granite_ray.serve.batching import TokenBudgetBatcher
from granite_ray.serve.errors import InputError
from granite_ray.tokenizer import CHARS_PER_TOKEN_BOUND

INTERNAL_LOGGING = {"enable_access_log": False}  # gateway-to-model calls; the gateway logs each HTTP request


def refusals_returned(method):
    """A client's mistake travels back as a value: Serve would log a raised one as a replica failure."""
    @functools.wraps(method)
    async def call(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except InputError as refusal:
            return refusal
    return call


def use_threads(threads: int | None) -> int:
    """Torch threads: as configured, else the CPUs this replica holds (which serve.yaml may have overridden)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    threads = threads or max(1, math.ceil(cpus))
    torch.set_num_threads(threads)
    return threads


class EncoderReplica:
    """Tokens, length policy and batching shared by the dense and the sparse deployment."""

    sparse: bool

    def __init__(self, uri: str, config: ServeConfig, threads: int | None = None, calls_in_flight: int = 1) -> None:
        threads = use_threads(threads)
        # The batcher gathers up to max_batch_tokens from many requests, by default one forward of the device's
        # measured budget (EncoderConfig.token_budget=None); tokens alone bound a forward (max_batch=None).
        self.encoder = Encoder(uri, EncoderConfig(max_length=config.max_length, max_batch=None,
                                                  chunk_overlap=config.chunk_overlap))
        if self.encoder.sparse != self.sparse:
            raise ValueError(f"{uri}: a {'sparse' if self.encoder.sparse else 'dense'} model; serve it as "
                             f"{'sparse' if self.encoder.sparse else 'embedder'}")
        self.frame = len(self.encoder.prefix) + len(self.encoder.suffix)
        if config.chunk_overlap >= self.encoder.max_length - self.frame:
            raise ValueError(f"chunk_overlap {config.chunk_overlap} leaves no room in windows of {self.encoder.max_length} tokens")
        self.truncate_by_default = config.long_inputs == "truncate"
        self.max_windows = config.max_windows_per_input
        self.max_request_tokens = config.max_request_tokens
        self.vocab_size = len(self.encoder.tokenizer)
        self.batcher = TokenBudgetBatcher(self.encoder.embed_token_ids, config.max_batch_tokens or self.encoder.token_budget,
                                          config.batch_wait_timeout_s, threads, calls_in_flight)
        self.encoder.embed_token_ids([self.encoder.prefix + self.encoder.suffix])  # the first forward's one-off costs

    def describe(self) -> dict:
        return {"max_length": self.encoder.max_length, "dimension": self.encoder.dimension,
                "normalize": self.encoder.normalize, "sparse": self.encoder.sparse}

    async def _pooled(self, inputs: list[str] | list[list[int]], field: str, truncate: bool | None,
                      long_documents: str | None, prompt_name: str | None) -> tuple[np.ndarray, int]:
        """[len(inputs), dimension] pooled, not normalized, and the tokens the model read."""
        contents = await asyncio.to_thread(self._contents, inputs, field, prompt_name)
        windows = [self._windows(c, i, field, truncate, long_documents) for i, c in enumerate(contents)]
        sequences = [self.encoder.prefix + w + self.encoder.suffix for ws in windows for w in ws]
        tokens = sum(map(len, sequences))
        check_request_tokens(tokens, self.max_request_tokens, field)
        flat = np.asarray(await self.batcher.submit(sequences, tokens))
        owner = np.repeat(np.arange(len(contents)), [len(ws) for ws in windows])
        return pool_windows(flat, owner, len(contents), long_documents), tokens

    def _contents(self, inputs: list[str] | list[list[int]], field: str, prompt_name: str | None) -> list[list[int]]:
        if isinstance(inputs[0], list):
            for i, ids in enumerate(inputs):
                if not all(0 <= t < self.vocab_size for t in ids):
                    raise InputError(f"{field}[{i}]: token ids must lie in [0, {self.vocab_size}) for this model",
                                     param=field, code="invalid_token_id")
            return inputs
        prompt = {"query": self.encoder.query_prompt, "document": self.encoder.document_prompt}.get(prompt_name, "")
        # Never tokenize more than any policy could read: one token past a window (enough to tell "too long"),
        # or past the last window a chunked input may have.
        room = self.encoder.max_length - self.frame
        cut = (room * self.max_windows + 1) * CHARS_PER_TOKEN_BOUND
        return self.encoder.token_ids([(prompt + text)[:cut] for text in inputs])

    def _windows(self, content: list[int], index: int, field: str, truncate: bool | None,
                 long_documents: str | None) -> list[list[int]]:
        room = self.encoder.max_length - self.frame
        if len(content) <= room:
            return [content]
        if long_documents:
            windows = self.encoder.windows(content, self.encoder.config.chunk_overlap)
            if len(windows) > self.max_windows:
                raise InputError(f"{field}[{index}] makes more than this server's {self.max_windows} windows of "
                                 f"{self.encoder.max_length} tokens (max_windows_per_input)", param=field,
                                 code="input_too_long")
            return windows
        if truncate if truncate is not None else self.truncate_by_default:
            return [content[:room]]
        raise InputError(f"{field}[{index}] has {len(content) + self.frame} tokens, more than the model's limit of "
                         f"{self.encoder.max_length}; send truncate=true, or long_documents=chunk-mean or chunk-max",
                         param=field, code="input_too_long")


def check_request_tokens(tokens: int, limit: int, field: str) -> None:
    if tokens > limit:
        raise InputError(f"{field}: the request makes the model read {tokens} tokens, more than this server's limit of "
                         f"{limit} per request (max_request_tokens); split it", param=field, code="request_too_large", status=413)


@serve.deployment(logging_config=INTERNAL_LOGGING)
class Embedder(EncoderReplica):
    sparse = False

    @refusals_returned
    async def embed(self, inputs: list[str] | list[list[int]], field: str = "input", truncate: bool | None = None,
                    long_documents: str | None = None, prompt_name: str | None = None, normalize: bool | None = None,
                    dimensions: int | None = None) -> tuple[np.ndarray, int]:
        """Dense embeddings and the tokens read; `dimensions` keeps the first ones (Matryoshka), renormalized
        when the output is normalized: the model's own setting unless `normalize` says otherwise."""
        if dimensions is not None and dimensions > self.encoder.dimension:
            raise InputError(f"dimensions: {dimensions} is more than the model's {self.encoder.dimension}",
                             param="dimensions")
        pooled, tokens = await self._pooled(inputs, field, truncate, long_documents, prompt_name)
        pooled = pooled[:, :dimensions] if dimensions else pooled
        if self.encoder.normalize if normalize is None else normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled, tokens


@serve.deployment(logging_config=INTERNAL_LOGGING)
class SparseEncoder(EncoderReplica):
    sparse = True

    @refusals_returned
    async def embed_sparse(self, inputs: list[str] | list[list[int]], field: str = "inputs", truncate: bool | None = None,
                           long_documents: str | None = None, prompt_name: str | None = None
                           ) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
        """SPLADE term weights as (term ids, weights) per input, only the non-zero ones, and the tokens read."""
        pooled, tokens = await self._pooled(inputs, field, truncate, long_documents, prompt_name)
        rows = []
        for row in pooled:
            terms = np.flatnonzero(row > 0)
            rows.append((terms.astype(np.int32), row[terms]))
        return rows, tokens


@serve.deployment(logging_config=INTERNAL_LOGGING)
class Reranker:
    def __init__(self, uri: str, config: ServeConfig, threads: int | None = None, calls_in_flight: int = 1) -> None:
        threads = use_threads(threads)
        self.model = reranker.Reranker(uri, max_length=config.rerank_max_length, query_max_length=config.rerank_query_max_length)
        self.truncate_by_default = config.long_inputs == "truncate"
        self.max_request_tokens = config.max_request_tokens
        self.pair_frame = self.model.tokenizer.num_special_tokens_to_add(pair=True)
        self.batcher = TokenBudgetBatcher(self.model.score, config.max_batch_tokens or self.model.token_budget,
                                          config.batch_wait_timeout_s, threads, calls_in_flight)
        self.model.score([("warm", "up")])  # the first forward's one-off costs

    def describe(self) -> dict:
        return {"max_length": self.model.max_length}

    @refusals_returned
    async def score(self, query: str, documents: list[str], field: str = "documents",
                    truncate: bool | None = None) -> tuple[np.ndarray, int]:
        """One relevance logit per document, in input order, and the tokens read. A pair over the limit
        loses the end of its document (the query is kept whole), or is refused when truncation is off."""
        limit = self.model.max_length
        documents = [doc[:(limit + 1) * CHARS_PER_TOKEN_BOUND] for doc in documents]  # never tokenized past the limit
        lengths = await asyncio.to_thread(self._pair_lengths, query, documents)
        if lengths[0] + self.pair_frame >= limit:
            raise InputError(f"query: {lengths[0]} tokens leave no room for a document within the reranker's "
                             f"limit of {limit}", param="query", code="input_too_long")
        pairs = lengths[0] + lengths[1:] + self.pair_frame
        if not (truncate if truncate is not None else self.truncate_by_default) and (pairs > limit).any():
            index = int(np.argmax(pairs > limit))
            raise InputError(f"{field}[{index}] with the query has {pairs[index]} tokens, more than the reranker's "
                             f"limit of {limit}; send truncate=true", param=field, code="input_too_long")
        tokens = int(np.minimum(pairs, limit).sum())
        check_request_tokens(tokens, self.max_request_tokens, field)
        scores = await self.batcher.submit([(query, doc) for doc in documents], tokens)
        return np.asarray(scores), tokens

    def _pair_lengths(self, query: str, documents: list[str]) -> np.ndarray:
        """Content tokens of the query, then of each document."""
        ids = self.model.tokenizer([query, *documents], add_special_tokens=False, verbose=False)["input_ids"]
        return np.array([len(x) for x in ids])
