"""Training stages on query/passage rows as Ray jobs: contrastive fine-tuning, distillation,
conversational adaptation, the cross-encoder reranker and the SPLADE sparse encoder.

Each reads FlagEmbedding-style rows through Ray Data, starts from `model.init_from` (an
artifact URI or any HF/sentence-transformers encoder folder) and writes a new artifact that
`SentenceTransformer(path)` and `AutoModel` load (the reranker: `CrossEncoder(path)`; the sparse
encoder: `SparseEncoder(path)`).
"""

from __future__ import annotations

import json

import ray
from transformers import AutoTokenizer

from granite_ray import storage
from granite_ray.config import RerankerConfig, RetrieverStageConfig
from granite_ray.data.pairs import read_pairs, sampling_weights
from granite_ray.inference.encoder import sentence_transformers_settings
from granite_ray.runtime import init_ray, log
from granite_ray.stages.registry import STAGES
from granite_ray.tokenizer import tokenizer_files
from granite_ray.train.loop import run_training


def run_embedding_stage(config: RetrieverStageConfig | RerankerConfig) -> str:
    """Any stage on query/passage rows: its objective says how its tokenizer and rows are prepared."""
    objective = STAGES[config.stage].objective_cls
    storage.apply_storage_env(config.storage)
    with storage.local_copy(config.model.init_from) as folder:  # a missing model fails before Ray starts
        tokenizer = objective.prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder)))
        prompts = sentence_transformers_settings(folder)["prompts"]
    init_ray(config)
    data = config.data
    if data.query_prompt is None and prompts.get("query"):
        data.query_prompt = prompts["query"]
    if data.passage_prompt is None and (prompts.get("document") or prompts.get("passage")):
        data.passage_prompt = prompts.get("document") or prompts.get("passage")
    datasets, sizes, counter = read_pairs(data, *objective.row_tokenizer(config, tokenizer))
    weights = sampling_weights(sizes, data.sampling_power)
    log(f"{config.stage}: datasets {sizes} sampled with probabilities "
        f"{ {k: round(v, 3) for k, v in weights.items()} }")
    result = run_training(config, objective, {name: datasets[name] for name in weights}, tokenizer_files(tokenizer), weights)
    dropped = ray.get(counter.examples.remote())
    stats = {"rows": sizes, "sampling_weights": weights, "dropped_rows": {k: len(v) for k, v in dropped.items()},
             "dropped_examples": {k: v[:20] for k, v in dropped.items()}, "final_metrics": result.metrics}
    storage.add_to_output(config.output_uri, "data_stats.json", json.dumps(stats, indent=2).encode())
    for reason, rows in dropped.items():
        log(f"dropped {len(rows)} rows ({reason}), e.g. {rows[0]}")
    log(f"artifact written to {config.output_uri}")
    return config.output_uri
