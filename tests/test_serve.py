"""Ray Serve: a real Serve app on 127.0.0.1 with all-MiniLM-L6-v2 as embedder, a MiniLM cross-encoder
(seeded random head) as reranker and a tiny SPLADE model loaded from S3, reached through the official
`openai` client and plain HTTP. Vectors and scores equal the models in process; bad input gets a 4xx
and the server keeps serving; 2,000 requests at concurrency 32 finish without error; killing an
embedder replica under load loses at most 1% and the deployment recovers; a wrong or missing key is
refused; cluster/serve.yaml builds; the CLI serves on loopback until interrupted."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import httpx
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, cranfield_texts

from granite_ray.config import ConfigError, ServeConfig, load_config
from granite_ray.localray import free_port

API_KEY = f"key-{uuid.uuid4().hex}"
MAX_BYTES, MAX_WINDOWS, MAX_TOKENS = 1 << 20, 8, 32768
APP = "granite-ray-test"
MAX_INPUTS = 64


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory, minilm_path):
    """MiniLM with a one-label classification head drawn from a fixed seed."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("reranker")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=1).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sparse_path(tmp_path_factory, tiny_mlm):
    """The tiny BERT MLM (random weights) in sentence-transformers' SparseEncoder layout."""
    import shutil

    from granite_ray.objectives.sparse import sparse_encoder_files

    path = tmp_path_factory.mktemp("sparse") / "model"
    shutil.copytree(tiny_mlm, path)
    vocab_size = json.loads((path / "config.json").read_text())["vocab_size"]
    for name, content in sparse_encoder_files(vocab_size, 128, {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(content)
    return str(path)


@pytest.fixture(scope="module")
def server(ray_local, s3, minilm_path, reranker_path, sparse_path):
    """The app on a free loopback port, the sparse encoder loaded from S3; two embedder replicas, so one
    can be killed under load."""
    from ray import serve

    from granite_ray import storage
    from granite_ray.serve.app import build_app

    bucket = f"serve-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=bucket)
    storage.publish_dir(sparse_path, f"s3://{bucket}/splade")
    port = free_port()
    config = load_config(ServeConfig, None, [
        f"embedder=minilm={minilm_path}", f"reranker=rr={reranker_path}", f"sparse=splade=s3://{bucket}/splade",
        f"api_key={API_KEY}", f"app_name={APP}", f"port={port}", f"max_inputs_per_request={MAX_INPUTS}",
        f"max_request_bytes={MAX_BYTES}", f"max_windows_per_input={MAX_WINDOWS}", f"max_request_tokens={MAX_TOKENS}", "gateway_replicas.num_cpus=0.2", "embedder_replicas.min_replicas=2", "embedder_replicas.max_replicas=2",
        "embedder_replicas.num_cpus=0.3", "embedder_replicas.threads=1", "reranker_replicas.num_cpus=0.3",
        "sparse_replicas.num_cpus=0.3"])
    serve.start(http_options={"host": config.host, "port": port})
    serve.run(build_app(config), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def texts():
    """Real abstracts of mixed lengths, one longer than MiniLM's 256 tokens."""
    texts = cranfield_texts(40)
    long = max(texts, key=len)
    return [t for t in texts if t != long][:9] + [long + " " + long]


def test_openai_client_returns_the_models_vectors_in_base64_and_float(server, texts, minilm_path):
    import openai
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    reference = SentenceTransformer(minilm_path, device="cpu").encode(texts)
    default = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64
    as_float = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    for response in (default, as_float):
        got = np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)])
        np.testing.assert_allclose(got, reference, atol=2e-5)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    expected_tokens = sum(min(len(tokenizer(t)["input_ids"]), 256) for t in texts)  # the long one truncated
    assert default.usage.prompt_tokens == default.usage.total_tokens == expected_tokens
    assert default.model == "minilm"

    short = client.embeddings.create(model="minilm", input=texts[0], dimensions=64, encoding_format="float")
    first = reference[0][:64]
    np.testing.assert_allclose(short.data[0].embedding, first / np.linalg.norm(first), atol=2e-5)
    ids = tokenizer(texts[1], add_special_tokens=False)["input_ids"]
    by_ids = client.embeddings.create(model="minilm", input=[ids], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, reference[1], atol=2e-5)


def test_raw_base64_is_little_endian_float32(http, texts):
    body = http.post("/v1/embeddings", json={"input": texts[:2], "encoding_format": "base64"}).json()
    as_float = http.post("/v1/embeddings", json={"input": texts[:2]}).json()
    assert len(body["data"]) == len(as_float["data"]) == 2  # zip over empty lists would pass anything
    for coded, plain in zip(body["data"], as_float["data"]):
        assert len(np.frombuffer(base64.b64decode(coded["embedding"]), dtype="<f4")) == len(plain["embedding"]) == 384
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(coded["embedding"]), dtype="<f4"),
                                   np.array(plain["embedding"], dtype=np.float32), atol=1e-6)


def test_long_inputs_are_chunked_and_pooled_on_request(http, texts, minilm_path):
    from granite_ray.config import EncoderConfig
    from granite_ray.inference.encoder import Encoder

    encoder = Encoder(minilm_path, EncoderConfig(chunk_overlap=100))
    for mode in ("chunk-mean", "chunk-max"):
        body = http.post("/v1/embeddings", json={"input": texts[-2:], "long_documents": mode}).json()
        got = np.array([d["embedding"] for d in body["data"]])
        np.testing.assert_allclose(got, encoder.encode(texts[-2:], long_documents=mode), atol=2e-5)
    tei = http.post("/embed", json={"inputs": texts[-1], "long_documents": "chunk-mean", "normalize": False}).json()
    unnormalized = Encoder(minilm_path, EncoderConfig(normalize=False)).encode([texts[-1]], long_documents="chunk-mean")
    np.testing.assert_allclose(tei, unnormalized, atol=2e-5)


def test_tei_embed_and_embed_sparse_equal_the_models_in_process(http, texts, minilm_path, sparse_path):
    from sentence_transformers import SentenceTransformer

    from granite_ray.inference.encoder import Encoder

    tei = http.post("/embed", json={"inputs": texts[:4]}).json()
    np.testing.assert_allclose(tei, SentenceTransformer(minilm_path, device="cpu").encode(texts[:4]), atol=2e-5)

    sparse = http.post("/embed_sparse", json={"inputs": texts[:4], "truncate": True}).json()
    reference = Encoder(sparse_path).encode(texts[:4])
    assert reference.shape[1] == 30522 and (reference > 0).any()
    for row, expected in zip(sparse, reference):
        got = np.zeros_like(expected)
        got[[t["index"] for t in row]] = [t["value"] for t in row]
        assert all(t["value"] > 0 for t in row)  # only the non-zero terms travel
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_rerank_equals_cross_encoder_scores_and_order(http, texts, reranker_path):
    from sentence_transformers import CrossEncoder

    query = "pressure distribution on a wing at supersonic speed"
    documents = texts[:8]
    cross_encoder = CrossEncoder(reranker_path, device="cpu")
    expected = cross_encoder.predict([(query, d) for d in documents])
    order = list(np.argsort(-expected, kind="stable"))

    body = http.post("/v1/rerank", json={"model": "rr", "query": query, "documents": documents}).json()
    assert [r["index"] for r in body["results"]] == order
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], expected[order], atol=1e-5)
    assert body["usage"]["total_tokens"] > 0 and "document" not in body["results"][0]

    jina = http.post("/v1/rerank", json={"query": query, "documents": [{"text": d} for d in documents], "top_n": 3,
                                         "return_documents": True}).json()
    assert [r["index"] for r in jina["results"]] == order[:3]
    assert [r["document"]["text"] for r in jina["results"]] == [documents[i] for i in order[:3]]

    tei = http.post("/rerank", json={"query": query, "texts": documents, "raw_scores": True, "return_text": True}).json()
    logits = cross_encoder.predict([(query, d) for d in documents], activation_fn=torch.nn.Identity())
    assert [r["index"] for r in tei] == order
    np.testing.assert_allclose([r["score"] for r in tei], logits[order], atol=1e-4)
    assert tei[0]["text"] == documents[order[0]]


LONG = "wing " * 400
BAD_REQUESTS = [
    ("/v1/embeddings", {"input": []}, 400, "input"),
    ("/v1/embeddings", {"input": ""}, 400, "input"),
    ("/v1/embeddings", {"input": ["fine", 3]}, 400, "input"),
    ("/v1/embeddings", {"input": ["fine", {"text": "x"}]}, 400, "input"),
    ("/v1/embeddings", {"input": ["x"] * (MAX_INPUTS + 1)}, 400, "input"),
    ("/v1/embeddings", {"input": LONG, "truncate": False}, 400, "input"),
    ("/embed", {"inputs": [LONG], "truncate": False}, 400, "inputs"),
    ("/embed_sparse", {"inputs": [LONG], "truncate": False}, 400, "inputs"),
    ("/v1/embeddings", b'{"input": ["unterminated', 400, None),
    ("/v1/embeddings", b"not json at all", 400, None),
    ("/v1/embeddings", {"input": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "model": "nope"}, 404, "model"),
    ("/v1/rerank", {"query": "q", "documents": ["a", "b"], "top_n": -1}, 400, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a", "b"], "top_n": 10 ** 12}, 400, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": []}, 400, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a", 7]}, 400, "documents"),
    ("/v1/rerank", {"documents": ["a"]}, 400, "query"),
    ("/v1/rerank", {"query": LONG * 2, "documents": ["a"]}, 400, "query"),
    ("/rerank", {"query": "q", "texts": ["a", LONG * 2], "truncate": False}, 400, "texts"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "dimensions": 385}, 400, "dimensions"),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, 400, "dimensions"),
    ("/v1/embeddings", {"input": [[101, 10 ** 9]]}, 400, "input"),
    ("/v1/nothing-here", {"input": "x"}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS, ids=[f"{i}-{p}" for i, (p, *_) in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_a_4xx_naming_the_problem_and_the_next_request_succeeds(http, path, body, status, param):
    sent = http.post(path, content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes) \
        else http.post(path, json=body)
    assert sent.status_code == status, sent.text
    error = sent.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]
    if param:
        assert param in error["message"]
    good = http.post("/v1/embeddings", json={"input": ["the server is still up"]})
    assert good.status_code == 200 and len(good.json()["data"][0]["embedding"]) == 384


def test_openai_client_reads_the_error_body(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="more than the model's limit of 256") as caught:
        client.embeddings.create(model="minilm", input=LONG, extra_body={"truncate": False})
    assert caught.value.code == "input_too_long" and caught.value.param == "input"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_hostile_bodies_are_refused_before_any_model_work(http):
    """A body over max_request_bytes (413, unread), a chunked body of unknown size (411), an input that would
    make more chunk windows than max_windows_per_input (400), and a request whose windows together pass
    max_request_tokens (413): each refused, and the server still answers."""
    huge = {"input": ["word " * (MAX_BYTES // 5)]}
    too_big = http.post("/v1/embeddings", json=huge)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    chunked = http.post("/v1/embeddings", content=iter([b'{"input": ["a"]}']), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 411
    endless = " ".join(["boundary layer transition at supersonic speed"] * 400)  # ~2,400 tokens: > 8 windows of 256
    refused = http.post("/v1/embeddings", json={"input": [endless], "long_documents": "chunk-mean"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "input_too_long"
    assert "max_windows_per_input" in refused.json()["error"]["message"]
    many = " ".join(["boundary layer transition at supersonic speed"] * 110)  # ~700 tokens: 3 windows, 64 inputs
    heavy = http.post("/v1/embeddings", json={"input": [many] * MAX_INPUTS, "long_documents": "chunk-mean"})
    assert heavy.status_code == 413 and heavy.json()["error"]["code"] == "request_too_large"
    assert "max_request_tokens" in heavy.json()["error"]["message"]
    short = " ".join(["boundary layer transition at supersonic speed"] * 100)
    assert len(http.post("/v1/embeddings", json={"input": [short], "long_documents": "chunk-mean"}).json()["data"]) == 1


def test_auth_rejects_a_missing_or_wrong_key(server):
    import openai

    payload = {"input": "x"}
    assert httpx.post(f"{server}/v1/embeddings", json=payload).status_code == 401
    wrong = httpx.post(f"{server}/v1/embeddings", json=payload, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": f"Basic {API_KEY}"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).embeddings.create(model="minilm", input="x")
    models = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert {m["id"]: m["type"] for m in models["data"]} == {"minilm": "embedding", "splade": "sparse-embedding", "rr": "rerank"}
    health = httpx.get(f"{server}/health", timeout=60)  # open: load balancers probe it without a key
    assert health.status_code == 200 and health.json()["models"]["minilm"]["dimension"] == 384
    # The schema lists every route: behind the key too; the browser docs are off when a key is set.
    assert httpx.get(f"{server}/openapi.json").status_code == 401
    schema = httpx.get(f"{server}/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert "/v1/embeddings" in schema["paths"]
    assert httpx.get(f"{server}/docs").status_code in (401, 404)


def test_a_request_the_models_do_not_answer_within_request_timeout_s_gets_504_naming_it(server, minilm_path):
    """The limit on a request's time, on a second app beside the first (1 ms: no batch of 64 abstracts
    is encoded that fast): 504 naming request_timeout_s, and the server goes on answering."""
    from ray import serve

    from granite_ray.serve.app import build_app

    config = load_config(ServeConfig, None, [
        f"embedder=minilm={minilm_path}", f"api_key={API_KEY}", "app_name=granite-ray-timeout", "request_timeout_s=0.001",
        "gateway_replicas.num_cpus=0.05", "embedder_replicas.num_cpus=0.1", "embedder_replicas.threads=1"])
    serve.run(build_app(config), name=config.app_name, route_prefix="/slow")
    try:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        slow = httpx.post(f"{server}/slow/v1/embeddings", json={"input": cranfield_texts(64)}, headers=headers, timeout=120)
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout", slow.text
        assert "request_timeout_s" in slow.json()["error"]["message"]
        again = httpx.post(f"{server}/v1/embeddings", json={"input": ["still serving"]}, headers=headers, timeout=120)
        assert again.status_code == 200 and len(again.json()["data"][0]["embedding"]) == 384
    finally:
        serve.delete(config.app_name)


@pytest.mark.job  # a CLI process: in this one, Ray's streamed replica logs of earlier tests share stderr
def test_an_exposed_host_without_an_api_key_is_refused_in_one_line(minilm_path):
    env = {k: v for k, v in os.environ.items() if k != "GRANITE_RAY_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "granite_ray.cli", "serve", f"embedder={minilm_path}", "host=0.0.0.0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 2 and "without an API key" in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and not done.stdout.strip()


async def _load(url: str, requests: int, concurrency: int, on_progress=None) -> tuple[list[str], float]:
    """Short-text embedding requests from `concurrency` workers; the failures (status or exception) and seconds."""
    queries = [t.split("\n")[0][:120] for t in cranfield_texts(200)]
    failures: list[str] = []
    done = 0
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker(offset: int) -> None:
            nonlocal done
            for i in range(offset, requests, concurrency):
                try:
                    reply = await client.post("/v1/embeddings", json={"input": queries[i % len(queries)]})
                    if reply.status_code != 200 or len(reply.json()["data"][0]["embedding"]) != 384:
                        failures.append(f"{reply.status_code}: {reply.text[:200]}")
                except httpx.HTTPError as error:
                    failures.append(repr(error))
                done += 1
                if on_progress:
                    await on_progress(done)

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return failures, time.perf_counter() - start


def _metrics() -> str:
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def _metric_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and f'application="{APP}"' in line)


def test_2000_requests_at_concurrency_32_finish_without_errors_batched_across_callers(server):
    failures, seconds = asyncio.run(_load(server, 2000, 32))
    assert failures == [], failures[:5]
    print(f"2000 requests in {seconds:.1f} s ({2000 / seconds:.0f} req/s)")
    # Prometheus metrics of Serve and of our batcher: requests really share inference calls.
    deadline = time.time() + 90
    while time.time() < deadline:
        text = _metrics()
        calls = _metric_sum(text, "ray_granite_ray_inference_calls_total")
        requests = _metric_sum(text, "ray_granite_ray_batched_requests_total")
        if requests >= 2000 and _metric_sum(text, "ray_serve_num_http_requests_total") >= 2000:
            break
        time.sleep(5)
    assert requests >= 2000 and _metric_sum(text, "ray_serve_num_http_requests_total") >= 2000
    assert "ray_granite_ray_batch_tokens_bucket" in text and "ray_serve_deployment_processing_latency_ms" in text
    assert requests / calls > 2, f"{requests} requests in {calls} inference calls"


def _embedder_replicas() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{APP}#Embedder#")}


def test_killing_an_embedder_replica_under_load_loses_at_most_1_percent_and_recovers(server):
    import ray
    from ray import serve

    before = _embedder_replicas()
    assert len(before) == 2
    victim = sorted(before)[0]
    killed = asyncio.Event()

    async def kill_midway(done: int) -> None:
        if done == 300 and not killed.is_set():
            killed.set()
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    requests = 1000
    failures, _ = asyncio.run(_load(server, requests, 32, on_progress=kill_midway))
    assert killed.is_set()
    assert len(failures) <= requests // 100, failures[:5]

    # Recovered when a new replica actor exists beside the survivor and Serve counts both running: right
    # after the kill, Serve's status can still count the victim while its actor is already gone.
    deadline = time.time() + 180
    while time.time() < deadline:
        status = serve.status().applications[APP].deployments["Embedder"]
        replicas = _embedder_replicas()
        if status.status == "HEALTHY" and status.replica_states.get("RUNNING") == 2 and victim not in replicas \
                and len(replicas) == 2:
            break
        time.sleep(2)
    assert victim not in replicas and len(replicas) == 2 and status.status == "HEALTHY", (status, replicas)
    failures, _ = asyncio.run(_load(server, 64, 8))
    assert failures == []


def test_token_budget_batcher_groups_by_tokens_and_isolates_failures(ray_local):
    from granite_ray.serve.batching import TokenBudgetBatcher

    calls: list[list[int]] = []

    def infer(items: list[int]) -> list[int]:
        calls.append(list(items))
        if 13 in items:
            raise ValueError("unlucky item")
        return [2 * x for x in items]

    async def scenario():
        batcher = TokenBudgetBatcher(infer, max_batch_tokens=100, wait_timeout_s=0.2)
        # Five requests arrive together: 40 + 40 tokens fill one call, the third does not fit with them.
        jobs = [batcher.submit([1, 2], 40), batcher.submit([3], 40), batcher.submit([4], 40),
                batcher.submit([13], 10), batcher.submit([5, 6], 10)]
        return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(scenario())
    assert [list(r) for r in results[:3]] == [[2, 4], [6], [8]] and list(results[4]) == [10, 12]
    assert isinstance(results[3], ValueError)
    assert calls[0] == [1, 2, 3]  # 80 tokens; the next 40 would pass the budget
    assert calls[1] == [4, 13, 5, 6]  # 60 tokens, fails on 13 ...
    assert calls[2:] == [[4], [13], [5, 6]]  # ... then each request alone: only 13's fails


def test_token_budget_batcher_gives_a_lone_batch_every_thread_and_splits_a_queue_over_side_by_side_calls(ray_local):
    import threading

    import torch

    from granite_ray.serve.batching import TokenBudgetBatcher

    calls: list[tuple[list[int], int]] = []
    side_by_side = threading.Barrier(2, timeout=20)  # only two calls running at once get past it

    def infer(items: list[int]) -> list[int]:
        calls.append((list(items), torch.get_num_threads()))
        if items[0] >= 10:
            side_by_side.wait()
        return [2 * x for x in items]

    async def scenario():
        batcher = TokenBudgetBatcher(infer, max_batch_tokens=100, wait_timeout_s=0.05, threads=2, calls_in_flight=2)
        alone = await batcher.submit([1], 10)
        # 120 tokens queued, more than one call takes: two calls of half of them at once, one thread each.
        loaded = await asyncio.gather(*(batcher.submit([x], 30) for x in (10, 11, 12, 13)))
        return alone, loaded

    alone, loaded = asyncio.run(scenario())
    assert list(alone) == [2] and [list(r) for r in loaded] == [[20], [22], [24], [26]]
    assert calls[0] == ([1], 2)
    assert sorted(calls[1:]) == [([10, 11], 1), ([12, 13], 1)]


def test_a_replica_calls_one_forward_at_a_time_by_default_so_a_burst_is_shared_out(ray_local, minilm_path):
    """max_batch_tokens=None: an inference call holds one forward of the device's budget, so a burst of
    requests runs as short calls that free lanes share and that answer as each ends, not as one long call
    that leaves a lane idle once the queue is empty."""
    import ray

    from granite_ray.serve.deployments import Embedder

    @ray.remote(num_cpus=0.25)
    class Replica(Embedder.func_or_class):  # the deployment's class in an actor of its own, without Serve
        async def burst(self, texts: list[str]) -> tuple[list[int], list[int], int, int]:
            calls: list[int] = []
            infer = self.batcher.infer
            self.batcher.infer = lambda items: calls.append(sum(map(len, items))) or infer(items)
            replies = await asyncio.gather(*(self.embed(texts[i:i + 4]) for i in range(0, len(texts), 4)))
            return calls, [tokens for _, tokens in replies], self.batcher.max_batch_tokens, self.encoder.token_budget

    texts = cranfield_texts(64)
    default = Replica.remote(minilm_path, load_config(ServeConfig, None, [f"embedder={minilm_path}"]), threads=2,
                             calls_in_flight=2)
    try:
        calls, request_tokens, call_budget, forward_budget = ray.get(default.burst.remote(texts), timeout=300)
    finally:
        ray.kill(default)  # its CPU reservation back before the next one starts (the serve app holds most of them)
    assert call_budget == forward_budget == 4096  # the CPU forward
    assert sum(request_tokens) == sum(calls) > 2 * 4096  # every token computed once
    assert len(calls) >= 3 and max(calls) <= 4096, calls
    wide = Replica.remote(minilm_path, load_config(ServeConfig, None, [f"embedder={minilm_path}", "max_batch_tokens=16384"]),
                          threads=2, calls_in_flight=2)
    try:
        calls, _, call_budget, forward_budget = ray.get(wide.burst.remote(texts), timeout=300)
    finally:
        ray.kill(wide)
    assert call_budget == 16384 and forward_budget == 4096 and max(calls) > 4096, calls  # forwards stay measured


def test_config_needs_a_model_binds_to_loopback_and_keeps_gateway_defaults_under_overrides():
    with pytest.raises(ConfigError, match="at least one model"):
        load_config(ServeConfig, None, ["port=8001"])
    config = load_config(ServeConfig, None, ["embedder=m=/models/m", "gateway_replicas.max_replicas=3"])
    assert config.host == "127.0.0.1" and config.embedder == "m=/models/m" and config.api_key is None
    assert config.gateway_replicas.max_replicas == 3 and config.gateway_replicas.num_cpus == 0.25
    with pytest.raises(ConfigError, match="min_replicas 2 exceeds max_replicas 1"):
        load_config(ServeConfig, None, ["reranker=/r", "reranker_replicas.min_replicas=2"])


def test_serve_yaml_validates_and_its_builder_builds_from_its_args():
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    from granite_ray.serve.app import build_app as builder

    schema = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text()))
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "granite_ray.serve.app:build_app"
    built = build_app(call_user_app_builder_with_args_if_necessary(builder, app.args), name=app.name)
    assert built.ingress_deployment_name == "Gateway"
    assert {d.name for d in built.deployments} == {d.name for d in app.deployments} == {
        "Gateway", "Embedder", "Reranker", "SparseEncoder"}
    for deployment in app.deployments:
        assert deployment.autoscaling_config["max_replicas"] >= deployment.autoscaling_config["min_replicas"]
    with pytest.raises(Exception, match="at least one model"):
        call_user_app_builder_with_args_if_necessary(builder, {"port": 8000})


@pytest.mark.job  # a Ray job or a CLI process
def test_cli_serves_on_loopback_until_interrupted(minilm_path, tmp_path):
    """`granite-ray serve` on its own embedded Ray: answers on 127.0.0.1 only, exits cleanly on SIGINT."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("GRANITE_RAY_API_KEY", "RAY_ADDRESS")}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "granite_ray.cli", "serve", f"embedder=minilm={minilm_path}", f"port={port}",
             "embedder_replicas.num_cpus=0.5", "gateway_replicas.num_cpus=0.1"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None and "serving at" not in log.read_text():
            time.sleep(2)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        body = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["no key needed"]}, timeout=60).json()
        assert len(body["data"][0]["embedding"]) == 384
        import psutil

        listening = {c.laddr.ip for c in psutil.net_connections(kind="inet") if c.laddr.port == port and c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}  # not 0.0.0.0, not this machine's other addresses
        outside = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                   if a.family == socket.AF_INET and not a.address.startswith("127.")]
        for address in outside[:1]:  # and a client on another interface is turned away
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{address}:{port}/health", timeout=5)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        output = log.read_text()
        assert process.returncode == 0, output[-3000:]
        assert f"serving at http://127.0.0.1:{port}" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
