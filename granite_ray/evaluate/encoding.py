"""The encoder pool evaluation and mining share: queries and the streamed corpus through encoder actors,
only ids and embeddings back to the driver."""

from __future__ import annotations

import math
import os
import time
from typing import Any, Iterator

import numpy as np
import ray
import torch

from granite_ray import storage
from granite_ray.config import EncoderConfig, EncoderPoolFields
from granite_ray.data.corpus import object_column
from granite_ray.evaluate.beir import BeirDataset, iter_documents, read_documents
from granite_ray.evaluate.inverted_index import sparse_rows
from granite_ray.inference.encoder import Encoder
from granite_ray.runtime import check_fits_this_machine, init_ray, log

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


def _encode_with_actors(model_uri: str, dataset: BeirDataset, config: EncoderPoolFields, queries: dict):
    """Encoded batches from the Ray Data pool of EncodeRows actors, the corpus streamed to them."""
    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    rows = ray.data.from_items([{"id": q, "text": t} for q, t in zip(queries["id"], queries["text"])]).map_batches(
        _with_kind("query"), batch_size=None, num_cpus=0.25).union(
        read_documents(dataset, config.read_tasks).map_batches(_with_kind("doc"), batch_size=None, num_cpus=0.25))
    encoded = rows.map_batches(
        EncodeRows, fn_constructor_kwargs={"model_uri": model_uri, "encoder_config": config.encoder.model_dump(),
                                           "threads": math.ceil(config.cpus_per_actor)},
        batch_size=256, num_cpus=config.cpus_per_actor, num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=config.encode_actors))
    return encoded.iter_batches(batch_size=None, batch_format="numpy")


def encode_in_driver(corpus_uris: list[str], config: EncoderPoolFields) -> bool:
    """Whether one encoder in this process serves as well as the actor pool: one machine (the cluster joined
    has one node, or none is joined), at most one GPU, and corpora small enough that parallel reading cannot
    matter. It spares the pool's processes (each holds its own model) and gives torch every core."""
    if config.encode_in != "auto":
        return config.encode_in == "driver"
    if ray.is_initialized():
        if len([node for node in ray.nodes() if node["Alive"]]) != 1 or ray.cluster_resources().get("GPU", 0) > 1:
            return False
    elif torch.cuda.device_count() > 1:
        return False
    for uri in corpus_uris:
        fs, path = storage.resolve(uri)
        if fs.get_file_info(path).size > config.driver_max_mb * 2**20:
            return False
    return True


def start_encoding(config, corpus_uris: list[str]) -> bool:
    """Join the cluster the config names, if any; start an embedded Ray only if the encoder pool needs one.
    A run encoded in the driver on this machine needs no Ray at all (mining 100k documents peaked at
    3.40 GiB with Ray, 0.78 GiB without). The caller has exported the config's S3 settings (corpus sizes
    may be read from S3). Returns whether encoding runs in the driver."""
    joins_cluster = bool(config.ray_address or os.environ.get("RAY_ADDRESS"))
    if joins_cluster:
        init_ray(config)
    in_driver = encode_in_driver(corpus_uris, config)
    if not in_driver:
        init_ray(config)
    elif not joins_cluster:
        check_fits_this_machine(config)  # the numbers an embedded Ray would refuse are refused here too
    return in_driver


def iter_corpus(dataset: BeirDataset, config: EncoderPoolFields, in_driver: bool) -> Iterator[dict[str, np.ndarray]]:
    """Batches of {id, text}: read in this process for a run encoded in the driver, else streamed by Ray Data."""
    if in_driver:
        return iter_documents(dataset.corpus_uri)
    return read_documents(dataset, config.read_tasks).iter_batches(batch_size=4096, batch_format="numpy")


def _bounded_slices(texts, rows: int = 256, characters: int = 1 << 20) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive slices of at most `rows` texts and about `characters` characters, so a
    corpus of long documents (meetings of 50k characters) is encoded, and its progress shown, a minute at a time."""
    start, size = 0, 0
    for i, text in enumerate(texts):
        if i > start and (i - start == rows or size + len(text) > characters):
            yield start, i
            start, size = i, 0
        size += len(text)
    if start < len(texts):
        yield start, len(texts)


def encode_dataset(model_uri: str, dataset: BeirDataset, config: EncoderPoolFields,
                   in_driver: bool) -> tuple[list[str], Any, list[str], Any]:
    """(query ids, query embeddings, doc ids, doc embeddings): the corpus streams through one encoder in
    this process (`start_encoding` said so) or through the actor pool, the same EncodeRows either way.
    Sparse models' embeddings are (term ids, weights) lists instead of matrices."""
    queries = {"id": np.array(list(dataset.queries), dtype=object), "text": np.array(list(dataset.queries.values()), dtype=object)}
    if in_driver:
        threads = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else os.cpu_count() or 1
        log(f"{dataset.name}: encoding in the driver with {threads} threads", TAG)
        encode = EncodeRows(model_uri, config.encoder.model_dump(), threads)
        batches = (encode(_with_kind(kind)({"id": rows["id"][a:b], "text": rows["text"][a:b]}))
                   for kind, source in (("query", [queries]), ("doc", iter_documents(dataset.corpus_uri)))
                   for rows in source for a, b in _bounded_slices(rows["text"]))
    else:
        batches = _encode_with_actors(model_uri, dataset, config, queries)
    query_ids, doc_ids, query_parts, doc_parts = [], [], [], []
    start, last_report = time.perf_counter(), time.perf_counter()
    sparse = False
    for batch in batches:
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
            rate = len(doc_ids) / (last_report - start)
            log(f"{dataset.name}: {len(doc_ids)} documents encoded ({rate:.{0 if rate >= 10 else 2}f}/s)", TAG)
    if not doc_ids:
        raise ValueError(f"{dataset.corpus_uri}: the corpus has no documents")
    if sparse:
        def joined(parts):
            return [a for terms, _ in parts for a in terms], [a for _, weights in parts for a in weights]
        return query_ids, joined(query_parts), doc_ids, joined(doc_parts)
    doc_matrix = np.concatenate(doc_parts)
    del doc_parts
    return query_ids, np.concatenate(query_parts), doc_ids, doc_matrix

