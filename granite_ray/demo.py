"""`granite-ray demo`: the system end to end on an embedded local Ray, on a real corpus sample.

Today: BPE tokenizer -> stage-1 MLM on the tiny preset -> an artifact that
sentence-transformers loads, used to embed and rank a few real documents.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from granite_ray.config import PretrainMLMConfig, load_config
from granite_ray.pretrain import run_pretrain_mlm

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "pretrain_mlm_tiny.yaml"
SAMPLE = REPO / "data" / "sample"


def run_demo(output: str, overrides: list[str]) -> None:
    if not SAMPLE.exists():
        raise FileNotFoundError(f"demo corpus not found at {SAMPLE}: run the demo from a granite-ray checkout")
    out = Path(output).resolve()
    started = time.time()
    config = load_config(PretrainMLMConfig, DEMO_CONFIG, [
        f"data.paths=[{SAMPLE}]", f"output_uri={out / 'mlm-tiny'}", f"storage_path={out / 'runs'}",
        f"run_name=demo-mlm-{int(started)}", *overrides,
    ])
    print(f"[demo] stage 1 (MLM) on {config.data.paths[0]}: preset {config.model.preset}, "
          f"{config.train.max_steps} steps of {config.train.batch_size}x{config.data.max_seq_len} packed tokens", flush=True)
    artifact = run_pretrain_mlm(config)
    show_artifact(artifact)
    print(f"[demo] done in {time.time() - started:.0f} s; artifact: {artifact}", flush=True)


def show_artifact(artifact: str) -> None:
    """Load the artifact as a SentenceTransformer and rank a few sample documents, as a user would."""
    from sentence_transformers import SentenceTransformer

    metrics = [json.loads(line) for line in (Path(artifact) / "metrics.jsonl").read_text().splitlines()]
    print(f"[demo] MLM loss {metrics[0]['loss']:.3f} (step {metrics[0]['step']}) -> "
          f"{metrics[-1]['loss']:.3f} (step {metrics[-1]['step']})", flush=True)
    model = SentenceTransformer(artifact, device="cpu")
    docs = [json.loads(line) for line in (SAMPLE / "cranfield.jsonl").read_text().splitlines()[:50]]
    texts = [f"{d['title']}\n{d['text']}" for d in docs]
    query = docs[7]["title"]
    scores = model.similarity(model.encode([query]), model.encode(texts))[0]
    best = int(scores.argmax())
    print(f"[demo] SentenceTransformer({artifact!r}) -> {model.get_sentence_embedding_dimension()}-dim embeddings")
    print(f"[demo] query {query!r}\n[demo] top document {docs[best]['_id']}: {docs[best]['title']!r} "
          f"(cosine {float(scores[best]):.3f}; an MLM-only encoder is not yet a retriever)")
