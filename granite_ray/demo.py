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
    """Load the artifact as a user would: as a SentenceTransformer, and as a masked LM filling blanks."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    metrics = [json.loads(line) for line in (Path(artifact) / "metrics.jsonl").read_text().splitlines()]
    print(f"[demo] MLM loss {metrics[0]['loss']:.3f} (step {metrics[0]['step']}) -> "
          f"{metrics[-1]['loss']:.3f} (step {metrics[-1]['step']}); loss curve: {Path(artifact) / 'loss.png'}", flush=True)
    embedder = SentenceTransformer(artifact, device="cpu")
    vectors = embedder.encode(["boundary layer transition on a flat plate", "supersonic flow past a cone"])
    print(f"[demo] SentenceTransformer({artifact!r}).encode -> {vectors.shape} (CLS pooling)")
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    mlm = AutoModelForMaskedLM.from_pretrained(artifact).eval()
    text = "the effect of the boundary [MASK] on heat transfer"
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = mlm(**batch).logits[0]
    masked = int((batch["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0])
    guesses = [tokenizer.decode([i]).strip() for i in logits[masked].topk(5).indices.tolist()]
    print(f"[demo] fill-mask {text!r}: {guesses}")
