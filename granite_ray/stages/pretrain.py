"""Encoder pretraining stages as Ray jobs: tokenizer training and masked-LM pretraining."""

from __future__ import annotations

import json

import ray

from granite_ray import storage
from granite_ray.config import DataConfig, PretrainMLMConfig, TokenizerConfig, TrainTokenizerConfig, dump_config
from granite_ray.data.corpus import read_corpus
from granite_ray.data.packing import TokenizeAndPack
from granite_ray.runtime import init_ray, log
from granite_ray.stages.registry import STAGES
from granite_ray.tokenizer import load_tokenizer, save_tokenizer, tokenizer_files, train_tokenizer
from granite_ray.train.loop import run_training


def stream_texts(data: DataConfig, limit: int):
    ds, counter = read_corpus(data)
    for row in ds.limit(limit).iter_rows():
        yield row["text"]
    ray.kill(counter)


def obtain_tokenizer(tok_cfg: TokenizerConfig, data: DataConfig, model_init_from: str | None = None):
    """The tokenizer of `init_from`, else `tokenizer.path`, else one trained on the streamed corpus."""
    source = model_init_from or tok_cfg.path
    if source:
        return load_tokenizer(source)
    log(f"training a {tok_cfg.vocab_size}-token BPE tokenizer on up to {tok_cfg.train_docs} documents")
    return train_tokenizer(stream_texts(data, tok_cfg.train_docs), tok_cfg.vocab_size, tok_cfg.min_frequency)


def packed_dataset(data: DataConfig, tokenizer):
    """Corpus -> normalized rows -> tokenized and packed rows, all streamed; plus the drop counter."""
    docs, counter = read_corpus(data)
    special = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id}
    packed = docs.map_batches(
        TokenizeAndPack,
        fn_constructor_args=(tokenizer.backend_tokenizer.to_str(), data.max_seq_len, special),
        batch_size=data.pack_batch_docs,
        compute=ray.data.ActorPoolStrategy(size=data.tokenize_actors),
        num_cpus=0.25,
    )
    return packed, counter


def run_train_tokenizer(config: TrainTokenizerConfig) -> str:
    init_ray(config)
    tokenizer = obtain_tokenizer(config.tokenizer, config.data)
    save_tokenizer(tokenizer, config.output_uri, dump_config(config))
    log(f"tokenizer ({len(tokenizer)} tokens) written to {config.output_uri}")
    return config.output_uri


def run_pretrain_mlm(config: PretrainMLMConfig) -> str:
    init_ray(config)
    tokenizer = obtain_tokenizer(config.tokenizer, config.data, config.model.init_from)
    packed, counter = packed_dataset(config.data, tokenizer)
    result = run_training(config, STAGES[config.stage].objective_cls, {"train": packed}, tokenizer_files(tokenizer))
    dropped = ray.get(counter.totals.remote())
    stats = {"dropped_rows": dropped, "final_metrics": result.metrics}
    storage.add_to_output(config.output_uri, "data_stats.json", json.dumps(stats, indent=2).encode())
    log(f"dropped malformed rows: {dropped or 'none'}")
    log(f"artifact written to {config.output_uri}")
    return config.output_uri
