"""The encoder pool evaluation and mining share: queries and the streamed corpus through encoder actors,
only ids and embeddings back to the driver."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import ray
import torch

from granite_ray.config import EncoderConfig, EncoderPoolFields
from granite_ray.data.corpus import object_column
from granite_ray.encoder import Encoder
from granite_ray.evaluate.beir import BeirDataset, read_documents
from granite_ray.evaluate.inverted_index import sparse_rows
from granite_ray.runtime import log

TAG = "granite-ray eval"


class EncodeRows:
    """Ray Data actor: one encoder per actor; rows of kind "query" get the query prompt.

    Embeddings leave unit-length when the model's similarity is cosine, ready for inner-product search;
    a sparse model's leave as their non-zero term ids and weights."""

    def __init__(self, model_uri: str, encoder_config: dict, threads: int) -> None:
        torch.set_num_threads(max(threads, 1))
        self.encoder = Encoder(model_uri, EncoderConfig(**encoder_config))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embeddings = np.zeros((len(batch["id"]), self.encoder.dimension), dtype=np.float32)
        for kind, encode in (("query", self.encoder.encode_queries), ("doc", self.encoder.encode_documents)):
            rows = np.flatnonzero(batch["kind"] == kind)
            if len(rows):
                embeddings[rows] = encode([batch["text"][i] for i in rows])
        if self.encoder.similarity == "cosine":  # search by inner product
            embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        if self.encoder.sparse:
            terms, weights = sparse_rows(embeddings)
            return {"id": batch["id"], "kind": batch["kind"], "terms": object_column(terms), "weights": object_column(weights)}
        return {"id": batch["id"], "kind": batch["kind"], "embedding": embeddings}



def _with_kind(kind: str):
    def tag(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**batch, "kind": np.full(len(batch["id"]), kind, dtype=object)}
    return tag



def encode_dataset(model_uri: str, dataset: BeirDataset, config: EncoderPoolFields) -> tuple[list[str], Any, list[str], Any]:
    """(query ids, query embeddings, doc ids, doc embeddings): the corpus streams through the actor pool.
    Sparse models' embeddings are (term ids, weights) lists instead of matrices."""
    resources = ray.cluster_resources()
    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    queries = ray.data.from_items([{"id": q, "text": t} for q, t in dataset.queries.items()])
    docs = read_documents(dataset, config.read_tasks)
    rows = queries.map_batches(_with_kind("query"), batch_size=None, num_cpus=0.25).union(
        docs.map_batches(_with_kind("doc"), batch_size=None, num_cpus=0.25))
    encoded = rows.map_batches(
        EncodeRows, fn_constructor_kwargs={"model_uri": model_uri, "encoder_config": config.encoder.model_dump(),
                                           "threads": math.ceil(config.cpus_per_actor)},
        batch_size=256, num_cpus=config.cpus_per_actor, num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=config.encode_actors))
    query_ids, doc_ids, query_parts, doc_parts = [], [], [], []
    start, last_report = time.perf_counter(), time.perf_counter()
    sparse = False
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        is_query = batch["kind"] == "query"
        query_ids.extend(batch["id"][is_query].tolist())
        doc_ids.extend(batch["id"][~is_query].tolist())
        sparse = "terms" in batch
        for rows, parts in ((is_query, query_parts), (~is_query, doc_parts)):
            if sparse:
                parts.append((list(batch["terms"][rows]), list(batch["weights"][rows])))
            else:
                parts.append(batch["embedding"][rows])
        if time.perf_counter() - last_report > 30:
            last_report = time.perf_counter()
            log(f"{dataset.name}: {len(doc_ids)} documents encoded ({len(doc_ids) / (last_report - start):.0f}/s)", TAG)
    if not doc_ids:
        raise ValueError(f"{dataset.corpus_uri}: the corpus has no documents")
    if sparse:
        def joined(parts):
            return [a for terms, _ in parts for a in terms], [a for _, weights in parts for a in weights]
        return query_ids, joined(query_parts), doc_ids, joined(doc_parts)
    doc_matrix = np.concatenate(doc_parts)
    del doc_parts
    return query_ids, np.concatenate(query_parts), doc_ids, doc_matrix

