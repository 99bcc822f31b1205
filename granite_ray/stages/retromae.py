"""RetroMAE stages as Ray jobs: text (stage 4) and tables with their LLM summaries (stage 5).

Sources stream through Ray Data into examples {enc, dec} of framed token ids: a text document
becomes one example per `data.max_seq_len` window (dec empty: rebuild the window itself); a
table its linearization with each token's row and column (for the M1 mask), with the decoder
target its summary when one exists. Tabular RetroMAE
mixes its sources batch by batch (tables, tables with summaries, a replay of text).
"""

from __future__ import annotations

import json

import ray

from granite_ray import storage
from granite_ray.config import RetroMAEConfig
from granite_ray.data.corpus import DropCounter, read_corpus, read_record_lines, resolve_files
from granite_ray.data.examples import TokenizeExamples, summary_rows
from granite_ray.data.tables import read_tables
from granite_ray.inference.encoder import special_frame
from granite_ray.runtime import init_ray, log
from granite_ray.stages.registry import STAGES
from granite_ray.tokenizer import load_tokenizer, tokenizer_files
from granite_ray.train.loop import run_training


def _examples(ds: ray.data.Dataset, tokenizer, config: RetroMAEConfig, windows: bool) -> ray.data.Dataset:
    return ds.map_batches(TokenizeExamples, batch_size=256, num_cpus=0.25,
                          compute=ray.data.ActorPoolStrategy(size=config.data.tokenize_actors),
                          fn_constructor_args=(tokenizer.backend_tokenizer.to_str(), special_frame(tokenizer),
                                               config.data.max_seq_len, windows, tokenizer.sep_token_id))


# The tabular mix when tables.weights is not given (renormalized over the sources present). A fixed
# mix rather than one by source size: sizing a text corpus would mean reading all of it first.
DEFAULT_MIX = {"summaries": 0.5, "tables": 0.3, "text": 0.2}


def retromae_sources(config: RetroMAEConfig, tokenizer, counter) -> dict[str, ray.data.Dataset]:
    sources = {}
    if config.data.paths:
        text, _ = read_corpus(config.data, counter)
        sources["text"] = _examples(text.map_batches(lambda b: {"enc_text": b["text"]}, batch_size=None, num_cpus=0.25),
                                    tokenizer, config, windows=True)
    tables = config.tables
    if config.stage == "tabular-retromae" and tables.summaries:
        lines = read_record_lines(resolve_files(tables.summaries, "parquet", "tables.summaries"), config.data.read_tasks)
        sources["summaries"] = _examples(lines.map_batches(summary_rows, batch_size=None, num_cpus=0.25),
                                         tokenizer, config, windows=False)
    if config.stage == "tabular-retromae" and tables.tables:
        raw = read_tables(tables.tables, counter).map_batches(lambda b: {"cells": b["cells"]}, batch_size=None, num_cpus=0.25)
        sources["tables"] = _examples(raw, tokenizer, config, windows=False)
    return sources


def run_retromae(config: RetroMAEConfig) -> str:
    init_ray(config)
    tokenizer = load_tokenizer(config.model.init_from)
    counter = DropCounter.remote()
    sources = retromae_sources(config, tokenizer, counter)
    given = (config.tables.weights if config.tables else None) or DEFAULT_MIX
    unknown = set(config.tables.weights or {}) - set(sources) if config.tables else set()
    if unknown:
        raise ValueError(f"tables.weights: no source named {sorted(unknown)} (sources: {sorted(sources)})")
    present = {name: given.get(name, 0.0) for name in sources} if len(sources) > 1 else {name: 1.0 for name in sources}
    weights = {name: w / sum(present.values()) for name, w in present.items() if w > 0}
    log(f"{config.stage}: sources mixed with probabilities { {k: round(v, 3) for k, v in weights.items()} }")
    result = run_training(config, STAGES[config.stage].objective_cls, {name: sources[name] for name in weights}, tokenizer_files(tokenizer), weights)
    dropped = ray.get(counter.totals.remote())
    stats = {"dropped_rows": dropped, "sampling_weights": weights, "final_metrics": result.metrics}
    storage.add_to_output(config.output_uri, "data_stats.json", json.dumps(stats, indent=2).encode())
    log(f"artifact written to {config.output_uri}")
    return config.output_uri
