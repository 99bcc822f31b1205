"""`granite-ray speed`: encoding throughput by the paper's method (Granite Embedding R2, section 5.2).

Documents are cut into 512-token chunks with 100 tokens of overlap and encoded in batches of
128 chunks, in corpus order; we report documents/s and chunks/s for padded batches and for
padding-free (varlen) batches of the same chunks. Tokenization is done before the clock starts,
identically for both modes; on GPU the clock waits for the device.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from granite_ray import storage
from granite_ray.config import EncoderConfig, SpeedConfig, dump_config
from granite_ray.evaluate.beir import document_text, read_jsonl
from granite_ray.inference.encoder import Encoder


def read_texts(uri: str, max_docs: int | None) -> list[str]:
    """Document texts of a BEIR folder's corpus.jsonl or of a .jsonl file (title + text, as mteb joins them)."""
    path = uri if uri.endswith(".jsonl") else storage.join(uri, "corpus.jsonl")
    texts = [document_text(row) for row in read_jsonl(path, "corpus")[:max_docs]]
    if not texts:
        raise ValueError(f"{path}: no documents")
    return texts


def chunks_of(encoder: Encoder, texts: list[str], overlap: int) -> list[list[int]]:
    """Each document's overlapping windows of max_length tokens (special tokens included), in order."""
    return [encoder.prefix + w + encoder.suffix for content in encoder.token_ids(texts) for w in encoder.windows(content, overlap)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_encoding(encoder: Encoder, chunks: list[list[int]], batch_size: int, warmup_batches: int) -> float:
    """Seconds to encode all chunks in batches of batch_size, after warm-up batches."""
    batches = [chunks[i:i + batch_size] for i in range(0, len(chunks), batch_size)]
    for batch in batches[:warmup_batches]:
        encoder.forward_batch(batch)
    _sync(encoder.device)
    start = time.perf_counter()
    for batch in batches:
        encoder.forward_batch(batch)
    _sync(encoder.device)
    return time.perf_counter() - start


def measure(model_uri: str, texts: list[str], config: SpeedConfig, packed: bool) -> dict:
    encoder = Encoder(model_uri, EncoderConfig(max_length=config.chunk_tokens, packed=packed,
                                               attn_implementation=config.attn_implementation, precision=config.precision))
    chunks = chunks_of(encoder, texts, config.chunk_overlap)
    seconds = time_encoding(encoder, chunks, config.batch_size, config.warmup_batches)
    tokens = sum(len(c) for c in chunks)
    padded_slots = sum(len(b) * max(len(c) for c in b) for b in (chunks[i:i + config.batch_size]
                                                                   for i in range(0, len(chunks), config.batch_size)))
    return {"documents": len(texts), "chunks": len(chunks), "tokens": tokens, "seconds": seconds,
            "documents_per_s": len(texts) / seconds, "chunks_per_s": len(chunks) / seconds,
            "tokens_per_s": tokens / seconds, "pad_fraction_if_padded": 1 - tokens / padded_slots,
            "attn_implementation": encoder.model.config._attn_implementation, "dtype": str(encoder.model.dtype),
            "device": str(encoder.device)}


def run_speed(config: SpeedConfig) -> dict:
    storage.apply_storage_env(config.storage)
    texts = read_texts(config.corpus, config.max_docs)
    storage.begin_output(config.output_uri, dump_config(config).encode())
    results = {}
    for model_uri in config.models:
        label = model_uri.rstrip("/").rsplit("/", 1)[-1]
        results[label] = {}
        for mode in config.modes:
            r = measure(model_uri, texts, config, packed=mode == "packed")
            results[label][mode] = r
            sys.stdout.write(f"[granite-ray speed] {label} {mode}: {r['documents_per_s']:.2f} docs/s, "
                             f"{r['chunks_per_s']:.1f} chunks/s ({r['chunks']} chunks, {r['attn_implementation']}, {r['dtype']})\n")
        if {"padded", "packed"} <= set(results[label]):
            results[label]["packed_over_padded"] = results[label]["packed"]["chunks_per_s"] / results[label]["padded"]["chunks_per_s"]
    storage.write_bytes(storage.join(config.output_uri, "speed.json"), json.dumps(results, indent=2).encode())
    storage.commit_output(config.output_uri)
    return results
