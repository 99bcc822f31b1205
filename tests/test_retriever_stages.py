"""Embedding stages on the one Ray Train loop: cross-worker negatives, GradCache, distillation,
conversational queries, RetroMAE and tabular RetroMAE, each from an artifact to an artifact."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import SAMPLE, cranfield_rows, cranfield_texts
from conftest import SHARED_DATA as DATA
from safetensors.torch import load_file

from granite_ray.config import ContrastiveConfig, DistillConfig, RetroMAEConfig, TrainConfig, load_config


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "cranfield_pairs.jsonl"
    cranfield_rows(path, negatives=2, limit=64, with_scores=True)
    return path


def _contrastive(tmp_path, artifact, pairs, name: str, *overrides: str):
    from granite_ray.stages.retriever import run_embedding_stage

    out = tmp_path / name
    config = load_config(ContrastiveConfig, None, [
        f"model.init_from={artifact}", "model.dropout=0", f"data.datasets=[{pairs}]", "data.negatives=2",
        "data.passage_max_len=48", "data.query_max_len=24", "train.max_steps=3", "train.log_every=1", "train.lr=1e-4",
        "train.optimizer=adamw", "train.schedule=constant", "train.data_sharding=stride", "train.precision=fp32",
        "train.clip_grad_norm=null", "query_query=true", "doc_doc=true", f"storage_path={tmp_path / 'runs'}",
        f"output_uri={out}", f"run_name={name}", *overrides])
    run_embedding_stage(config)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return losses, load_file(str(out / "model.safetensors"))


def test_negatives_gathered_across_workers_and_grad_cache_match_one_worker_holding_the_batch(ray_local, tmp_path, minilm_path, pairs):
    """MiniLM with dropout off: any difference left is the order of float reductions."""
    whole, weights = _contrastive(tmp_path, minilm_path, pairs, "one-worker", "train.num_workers=1", "train.batch_size=8")
    split, split_weights = _contrastive(tmp_path, minilm_path, pairs, "two-workers", "train.num_workers=2",
                                        "train.cpus_per_worker=0.5", "train.batch_size=4")
    cached, cached_weights = _contrastive(tmp_path, minilm_path, pairs, "two-workers-gradcache", "train.num_workers=2",
                                          "train.cpus_per_worker=0.5", "train.batch_size=4", "grad_cache_chunk=5")
    alone, _ = _contrastive(tmp_path, minilm_path, pairs, "two-workers-local-negatives", "train.num_workers=2",
                            "train.cpus_per_worker=0.5", "train.batch_size=4", "gather_across_workers=false")
    assert len(whole) == 3
    # 2 workers x 4 rows, each query against all 8 rows' passages, equal the 8-row batch on one worker.
    assert split == pytest.approx(whole, rel=1e-5, abs=1e-5)
    assert cached == pytest.approx(whole, rel=1e-5, abs=1e-5)
    assert alone[0] < whole[0] - 0.1  # without gathering each query has fewer negatives: an easier loss
    initial = load_file(f"{minilm_path}/model.safetensors")
    moved = max((weights[k] - initial[k]).abs().max().item() for k in weights if k in initial)
    assert moved > 1e-4  # the weights moved, so agreeing weights mean agreeing gradients
    for key in weights:
        if key.endswith("attention.self.key.bias"):
            continue  # its exact gradient is zero (softmax ignores a per-query constant): AdamW scales float noise to full steps
        torch.testing.assert_close(split_weights[key], weights[key], atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(cached_weights[key], weights[key], atol=2e-6, rtol=1e-4)


class _OneProcess:
    """The single-process case of the strategies' interface (what DDP does with one worker)."""

    def __init__(self, model):
        self.model = model

    def accumulating(self, boundary):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss, boundary):
        loss.backward()


@pytest.mark.parametrize("chunk, dropout", [(1, False), (3, False), (7, False), (24, True)])
def test_grad_cache_equals_uncached_loss_and_gradients(minilm_path, tmp_path, pairs, chunk, dropout):
    """On MiniLM. With dropout on and one chunk of all 24 texts the masks match the uncached pass only
    if GradCache replays each chunk's RNG state in its second pass."""
    import contextlib

    from transformers import AutoTokenizer

    from granite_ray.data.pairs import TokenizePairs
    from granite_ray.inference.encoder import special_frame
    from granite_ray.objectives.retriever import ContrastiveObjective

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = load_config(ContrastiveConfig, None, [f"model.init_from={minilm_path}", f"data.datasets=[{pairs}]",
                                                   "data.negatives=2", "data.passage_max_len=32", "query_query=true",
                                                   "doc_query=true", f"grad_cache_chunk={chunk}"])
    lines = pairs.read_bytes().splitlines()[:6]
    batch = TokenizePairs(tokenizer.backend_tokenizer.to_str(), special_frame(tokenizer), config.data.model_dump(), False,
                          None)({"line": np.array(lines, dtype=object), "source": np.array(["p"] * 6, dtype=object),
                                 "lineno": np.arange(6)})
    objective = ContrastiveObjective(config, tokenizer)
    model = objective.build_model().train(dropout)
    inputs = objective.batch_inputs(batch, torch.device("cpu"))
    results = []
    for cache in (None, chunk):
        objective.config.grad_cache_chunk = cache
        model.zero_grad()
        torch.manual_seed(0)
        loss = objective.forward_backward(_OneProcess(model), inputs, 0.5, True, contextlib.nullcontext)
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain_loss, plain_grads), (cached_loss, cached_grads) = results
    assert cached_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain_grads.keys() == cached_grads.keys() and len(plain_grads) > 50
    for name in plain_grads:
        torch.testing.assert_close(cached_grads[name], plain_grads[name], atol=1e-6, rtol=1e-4)


def test_distillation_stage_from_s3_artifact_to_s3_artifact_learns_teacher_order(ray_local, s3, bucket, tmp_path, minilm_path, pairs):
    from sentence_transformers import SentenceTransformer

    from granite_ray import storage
    from granite_ray.stages.retriever import run_embedding_stage

    storage.publish_dir(minilm_path, f"s3://{bucket}/minilm")
    storage.write_bytes(f"s3://{bucket}/kd/rows.jsonl", pairs.read_bytes())
    config = load_config(DistillConfig, None, [
        f"model.init_from=s3://{bucket}/minilm", f"data.datasets=[s3://{bucket}/kd]", "data.negatives=2",
        "data.passage_max_len=64", "train.batch_size=8", "train.max_steps=8", "train.log_every=2", "train.lr=5e-5",
        "train.optimizer=adamw", "train.schedule=constant", f"storage_path=s3://{bucket}/runs",
        f"output_uri=s3://{bucket}/distilled", "run_name=kd"])
    run_embedding_stage(config)
    local = storage.download_dir(f"s3://{bucket}/distilled", tmp_path / "distilled")
    losses = [json.loads(line)["loss"] for line in (local / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]
    model = SentenceTransformer(str(local), device="cpu")
    source = SentenceTransformer(minilm_path, device="cpu")
    assert [type(m).__name__ for m in model] == [type(m).__name__ for m in source]  # mean pooling + normalize kept
    assert model.encode(["a query"]).shape == (1, 384)
    # The student moved towards the teacher's distribution over each row's candidates (what it trained on).
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    teacher = torch.tensor([r["pos_scores"] + r["neg_scores"] for r in rows]) / 0.02

    def divergence(m) -> float:
        q = torch.from_numpy(m.encode([r["query"] for r in rows], normalize_embeddings=True))
        d = torch.from_numpy(m.encode([t for r in rows for t in r["pos"] + r["neg"]], normalize_embeddings=True))
        student = torch.einsum("nd,nkd->nk", q, d.reshape(len(rows), 3, -1)) / 0.02
        return float(torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                                reduction="batchmean"))

    assert divergence(model) < divergence(source)


def test_conversation_queries_put_the_latest_turn_first_and_truncate_the_oldest(minilm_path):
    from transformers import AutoTokenizer

    from granite_ray.data.pairs import TokenizePairs, format_conversation, parse_pair
    from granite_ray.inference.encoder import special_frame

    rows = [json.loads(line) for line in (DATA / "mtrag_ibmcloud" / "queries.jsonl").read_text().splitlines()]
    turns = max(rows, key=lambda r: len(r["conversation"]))["conversation"]
    text = format_conversation(turns)
    assert text.splitlines()[0] == f"|{turns[-1]['speaker']}|: {turns[-1]['text'].strip()}"
    assert text.rstrip().endswith(turns[0]["text"].strip())
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = DistillConfig.model_validate({"model": {"init_from": minilm_path}, "data": {
        "datasets": ["x"], "negatives": 1, "query_max_len": 32}})
    record = {"query": turns, "pos": ["p"], "neg": ["n"], "pos_scores": [0.9], "neg_scores": [0.1]}
    out = TokenizePairs(tokenizer.backend_tokenizer.to_str(), special_frame(tokenizer), config.data.model_dump(), True, None)(
        {"line": np.array([json.dumps(record).encode()], dtype=object), "source": np.array(["c"], dtype=object),
         "lineno": np.array([1])})
    query = tokenizer.decode(out["query"][0], skip_special_tokens=True)
    assert len(out["query"][0]) == 32
    assert query.startswith(tokenizer.decode(tokenizer(f"|{turns[-1]['speaker']}|: {turns[-1]['text']}",
                                                       add_special_tokens=False)["input_ids"][:10]))
    assert turns[0]["text"][:20].lower() not in query  # the oldest turn is what truncation dropped
    with pytest.raises(ValueError, match="pos_scores"):
        parse_pair({"query": "q", "pos": ["p"], "neg": ["n"]}, 1, with_scores=True)
    assert parse_pair({"query": "q", "pos": "p", "neg": ["a", "b"]}, 5, False)["negs"] == ["a", "b", "a", "b", "a"]


def test_teacher_margin_leaves_out_negatives_the_teacher_scores_with_the_positive():
    from granite_ray.data.pairs import parse_pair, teacher_ordered
    from granite_ray.data.rows import RowError

    row = {"query": "q", "pos": ["p"], "neg": ["a", "b", "c", "d"], "pos_scores": [0.8], "neg_scores": [0.9, 0.5, 0.76, 0.7]}
    # 0.95 * 0.8 = 0.76: "a" (above the positive) and "c" (at the margin) go; "b", "d" stay and are cycled to 3.
    kept = parse_pair(row, 3, True, teacher_margin=0.95)
    assert kept["negs"] == ["b", "d", "b"] and kept["scores"] == [0.8, 0.5, 0.7, 0.5]
    assert parse_pair(row, 3, True)["negs"] == ["a", "b", "c"]  # None keeps every negative (the paper)
    ordered = parse_pair(teacher_ordered(row), 2, False, teacher_margin=0.95)  # the reranker's lists: best first
    assert ordered["negs"] == ["d", "b"]
    with pytest.raises(RowError, match="within teacher_margin"):
        parse_pair({**row, "neg_scores": [0.9, 0.8, 0.79, 0.77]}, 3, True, teacher_margin=0.95)
    with pytest.raises(RowError, match="neg_scores"):
        parse_pair({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [0.8]}, 1, False, teacher_margin=0.95)


def test_a_small_dataset_is_tokenized_once_in_file_order_and_a_large_one_streams(ray_local, pairs, minilm_path):
    from ray.data.dataset import MaterializedDataset
    from transformers import AutoTokenizer

    from granite_ray.config import PairDataConfig
    from granite_ray.data.pairs import TokenizePairs, read_pairs
    from granite_ray.inference.encoder import special_frame

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)

    def read(cache_rows: int):
        data = PairDataConfig(datasets=[str(pairs)], negatives=2, passage_max_len=32, cache_rows=cache_rows)
        args = (tokenizer.backend_tokenizer.to_str(), special_frame(tokenizer), data.model_dump(), False)
        datasets, sizes, _ = read_pairs(data, TokenizePairs, args)
        assert sizes == {"cranfield_pairs.jsonl": 64}
        return datasets["cranfield_pairs.jsonl"]

    cached, streamed = read(64), read(63)
    assert isinstance(cached, MaterializedDataset) and not isinstance(streamed, MaterializedDataset)
    queries = [json.loads(line)["query"] for line in pairs.read_text().splitlines()]
    decoded = [tokenizer.decode(row["query"], skip_special_tokens=True) for row in cached.take_all()]
    assert decoded == [tokenizer.decode(tokenizer(q)["input_ids"], skip_special_tokens=True) for q in queries]  # file order
    ids = lambda ds: sorted(row["query"].tolist() for row in ds.take_all())  # noqa: E731
    assert ids(cached) == ids(streamed)  # the same rows a streamed epoch holds


def test_mixture_draws_the_same_dataset_on_every_worker_in_proportion_to_sqrt_size():
    from granite_ray.data.pairs import sampling_weights
    from granite_ray.train.loop import _mixed_batches

    weights = sampling_weights({"big": 900, "small": 100}, 0.5)
    assert weights["big"] == pytest.approx(0.75) and weights["small"] == pytest.approx(0.25)

    class Shard:
        def __init__(self, name, rows):
            self.name, self.rows = name, rows

        def iter_batches(self, batch_size, **_):
            for start in range(0, self.rows - batch_size + 1, batch_size):
                yield {"source": np.array([self.name] * batch_size)}

    def draws(rank_seed_start):
        tc = TrainConfig(batch_size=4, drop_last=True, seed=7)
        stream = _mixed_batches({"big": Shard("big", 40), "small": Shard("small", 8)}, weights, tc, rank_seed_start, 0)
        return [next(stream)["source"][0] for _ in range(2000)]

    first, again = draws(0), draws(0)
    assert first == again  # what every worker computes
    assert first[10:] == draws(10)[:-10]  # a resume at micro-batch 10 continues the same sequence
    assert first.count("small") / len(first) == pytest.approx(0.25, abs=0.03)


def test_a_shuffle_buffer_permutes_rows_the_same_way_on_every_worker():
    from granite_ray.train.loop import _epoch_batches

    class Shard:  # the stream a worker's dataset shard gives, in file order
        def iter_batches(self, batch_size, drop_last, **_):
            for start in range(0, 200 - (batch_size - 1 if drop_last else 0), batch_size):
                yield {"id": np.arange(start, min(start + batch_size, 200))}

    def order(epoch, buffer, drop_last=False):
        tc = TrainConfig(batch_size=16, seed=3, shuffle_buffer_rows=buffer, drop_last=drop_last)
        batches = list(_epoch_batches(Shard(), tc, epoch))
        assert all(len(b["id"]) == 16 for b in batches[:-1])
        return [int(i) for b in batches for i in b["id"]]

    first = order(0, 64)
    assert sorted(first) == list(range(200))  # every row once
    assert sum(a == b for a, b in zip(first, range(200))) < 20  # not file order
    assert max(abs(position - row) for position, row in enumerate(first)) > 64  # rows travel beyond the buffer
    assert order(0, 64) == first  # what each stride-sharded worker (and a resume) computes
    assert order(1, 64) != first  # a new order each epoch
    assert order(0, 0) == list(range(200))
    assert len(order(0, 64, drop_last=True)) == 192  # 12 full batches of 16


def test_retromae_decoder_loss_falls_on_real_text(ray_local, tmp_path, tiny_artifact):
    from granite_ray.stages.retromae import run_retromae

    out = tmp_path / "retromae"
    config = load_config(RetroMAEConfig, None, [
        f"model.init_from={tiny_artifact}", "model.global_rope_theta=80000", f"data.paths=[{SAMPLE}/cranfield.jsonl]",
        "data.max_seq_len=128", "train.batch_size=16", "train.max_steps=60", "train.log_every=5", "train.lr=3e-3",
        "train.schedule=constant", f"storage_path={tmp_path / 'runs'}", f"output_uri={out}", "run_name=retromae"])
    run_retromae(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    decoder = [r["decoder_loss"] for r in records]
    assert len(decoder) == 12 and np.mean(decoder[-3:]) < np.mean(decoder[:3]) - 0.5, decoder
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(out))  # the artifact is the encoder alone
    assert encoder.config.rope_parameters["full_attention"]["rope_theta"] == 80000


def test_tabular_retromae_mixes_tables_summaries_and_text(ray_local, tmp_path, tiny_artifact):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from granite_ray.data.tables import parse_table
    from granite_ray.stages.retromae import run_retromae

    rows = [json.loads(line) for line in (DATA / "fetaqa_dev" / "corpus.jsonl").read_text().splitlines()[:64]]
    summaries = tmp_path / "summaries"
    summaries.mkdir()
    # Stand-ins for LLM summaries: the tables' real titles and first rows, in words.
    pq.write_table(pa.table({
        "cells": [parse_table(r["text"], "markdown").cells() for r in rows],
        "summary": [f"{r['title']}: " + ", ".join(parse_table(r["text"], "markdown").rows[0]) for r in rows]}),
        summaries / "part-0.parquet")
    out = tmp_path / "tabular"
    config = load_config(RetroMAEConfig, None, [
        "stage=tabular-retromae", f"model.init_from={tiny_artifact}", f"data.paths=[{SAMPLE}/cranfield.jsonl]",
        "data.max_seq_len=128", "data.mlm_probability=0.2", "decoder_mask_probability=0.6",
        f"tables.summaries=[{summaries}]", f"tables.tables.paths=[{DATA / 'fetaqa_dev' / 'corpus.jsonl'}]",
        "tables.weights={summaries: 0.5, tables: 0.3, text: 0.2}", "train.batch_size=8", "train.max_steps=12",
        "train.log_every=4", "train.lr=1e-3", f"storage_path={tmp_path / 'runs'}", f"output_uri={out}", "run_name=tab"])
    run_retromae(config)
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["sampling_weights"] == pytest.approx({"summaries": 0.5, "tables": 0.3, "text": 0.2})
    trained = {name: stats["final_metrics"][f"rows_from_{name}"] for name in ("summaries", "tables", "text")}
    assert sum(trained.values()) == 12 * 8 and all(rows >= 8 for rows in trained.values())  # every source trained on
    assert all(np.isfinite(json.loads(line)["decoder_loss"]) for line in (out / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("stage", ["retromae", "tabular-retromae"])
def test_tabular_retromae_rebuilds_only_the_masked_summary_positions(tokenizer, stage):
    """R2 section 3.2: the table decoder predicts the masked summary positions (60%), hidden from every
    row; RetroMAE's enhanced decoding rebuilds every token, each row from its own sample of the others."""
    from granite_ray.data.masking import IGNORE_INDEX
    from granite_ray.objectives.retromae import RetroMAEObjective

    config = RetroMAEConfig.model_validate({
        "stage": stage, "model": {"init_from": "/m"}, "data": {"paths": ["/t"]}, "decoder_mask_probability": 0.6,
        "tables": {"summaries": ["/s"]}})
    assert config.decoder_targets == ("masked" if stage == "tabular-retromae" else "all")
    objective = RetroMAEObjective(config, tokenizer)
    objective.attn_implementation, objective.half_window, objective.layer_types = "sdpa", 0, None
    table = tokenizer("Year [SEP] Title [SEP] 1994 [SEP] Speed")["input_ids"]
    summaries = [tokenizer(t)["input_ids"] for t in cranfield_texts(16)]
    batch = {"enc": np.array([table] * 16, dtype=object), "dec": np.array(summaries, dtype=object)}
    inputs = objective.batch_inputs(batch, torch.device("cpu"))
    labels, visible, targets = inputs["target_labels"], inputs["visible"], inputs["targets"]
    content = ~torch.isin(targets, objective.special_ids)
    rebuilt = labels != IGNORE_INDEX
    assert (labels[rebuilt] == targets[rebuilt]).all()
    assert visible[:, :, 0].all()  # CLS, the table's vector, is seen by every row
    if stage == "retromae":
        assert torch.equal(rebuilt, content)
        return
    assert rebuilt.sum() / content.sum() == pytest.approx(0.6, abs=0.05)
    assert not (visible & rebuilt[:, None, :]).any()  # no row sees a masked summary token
    seen = visible.any(dim=1)
    assert torch.equal(seen[:, 1:] & content[:, 1:], (content & ~rebuilt)[:, 1:])  # every other summary token is seen


def test_table_tokens_are_the_linearized_texts_own_with_each_tokens_row_and_column(tokenizer, minilm_path):
    """The ids are those of the headers' text, the separator and the cells' text (R2's "headers [SEP]
    cells"), each text tokenized whole (a BPE and a WordPiece vocabulary), and each token carries the row
    and column of the header or cell it came from; the separator is global."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from granite_ray.data.examples import GLOBAL, table_tokens
    from granite_ray.data.tables import parse_table

    tables = [parse_table(json.loads(line)["text"], "markdown") for line in (DATA / "fetaqa_dev" / "corpus.jsonl").read_text().splitlines()[:20]]
    for hf in (tokenizer, AutoTokenizer.from_pretrained(minilm_path)):
        fast = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        fast.no_padding(), fast.no_truncation()
        for table in tables:
            ids, rows, cols = table_tokens(fast, table, hf.sep_token_id)
            cells = " ".join(cell for row in table.rows for cell in row if cell)
            whole = [hf(text, add_special_tokens=False)["input_ids"] for text in (" ".join(h for h in table.headers if h), f" {cells}")]
            assert ids == whole[0] + [hf.sep_token_id] + whole[1]
            assert len(rows) == len(cols) == len(ids)
            assert [i for i, r in enumerate(rows) if r == GLOBAL] == [ids.index(hf.sep_token_id)]
            for r, c in {(r, c) for r, c in zip(rows, cols) if r != GLOBAL}:
                cell = table.headers[c] if r == 0 else table.rows[r - 1][c]
                own = [t for t, rr, cc in zip(ids, rows, cols) if (rr, cc) == (r, c)]
                assert own == hf(cell if (r, c) == (rows[0], cols[0]) else f" {cell}", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("attention, implementation", [("m1", "auto"), ("full", "auto"), ("m1", "eager")])
def test_a_table_token_attends_to_its_row_its_column_and_the_frame_alone(tokenizer, tmp_path, attention, implementation):
    """Through one encoder layer (global attention) under the M1 mask, a cell's hidden state is blind to a
    cell in another row and column, and sees its row, its column's header and [CLS]; with full attention
    it sees everything. Tables of different lengths in one batch: each its own padded row, CLS first."""
    from granite_ray.config import ModelConfig, PretrainMLMConfig
    from granite_ray.data.examples import TokenizeExamples
    from granite_ray.data.tables import Table
    from granite_ray.inference.encoder import special_frame
    from granite_ray.models.modernbert import build_mlm_model, save_artifact
    from granite_ray.objectives.retromae import RetroMAEObjective

    torch.manual_seed(0)
    save_artifact(build_mlm_model(ModelConfig(num_hidden_layers=1), tokenizer), tokenizer, PretrainMLMConfig(), str(tmp_path), 256)
    config = RetroMAEConfig.model_validate({"stage": "tabular-retromae", "model": {"init_from": str(tmp_path), "attn_implementation": implementation},
                                            "tables": {"summaries": ["/s"], "attention": attention}, "data": {"mlm_probability": 1e-9}})
    objective = RetroMAEObjective(config, tokenizer)
    encoder = objective.build_model().encoder.eval()
    if attention == "m1":  # auto would pick flash-attn on a GPU that has it, which takes no mask
        assert encoder.config._attn_implementation == ("sdpa_varlen" if implementation == "auto" else implementation)
    tokenize = TokenizeExamples(tokenizer.backend_tokenizer.to_str(), special_frame(tokenizer), 256, False, tokenizer.sep_token_id)
    tables = [Table(["Speed", "Angle"], [["supersonic flow", "wing"], ["boundary layer", "shock"]]),
              Table(["Year", "Title"], [["1994", "heat transfer"]])]
    batch = tokenize({"cells": np.array([t.cells() for t in tables], dtype=object),
                      "dec_text": np.array(["a summary", "another"], dtype=object)})

    def encoded(enc: list, which: int = 0, tables: slice = slice(None)) -> torch.Tensor:
        """Table `which`'s hidden states, the `tables` of the batch encoded together with token ids `enc`."""
        rows = {k: v[tables] for k, v in batch.items()}
        inputs = objective.batch_inputs({**rows, "enc": np.array(enc, dtype=object)}, torch.device("cpu"))
        with torch.no_grad():
            out = encoder.base_model(input_ids=inputs["input_ids"], **inputs["packed"]).last_hidden_state
        start = int(inputs["cls_positions"][which])
        if len(enc) == 2:  # m1: one padded row per table; full: the tables packed in one row
            assert inputs["cls_positions"].tolist() == [0, out.shape[1] if attention == "m1" else len(enc[0])]
        flat = out.reshape(-1, out.shape[-1])
        assert torch.equal(inputs["input_ids"].reshape(-1)[start:start + len(enc[which])], torch.from_numpy(enc[which].astype(np.int64)))
        return flat[start:start + len(enc[which])]

    def hidden(enc: list) -> torch.Tensor:
        return encoded(enc, 0)

    rows, cols = batch["enc_rows"][0], batch["enc_cols"][0]
    at = {(r, c): int(np.flatnonzero((rows == r) & (cols == c))[0]) for r, c in zip(rows, cols) if r >= 0}
    base = hidden(list(batch["enc"]))
    word = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" pressure"))[0]

    def changed(cell: tuple[int, int], watched: tuple[int, int]) -> bool:
        enc = [e.copy() for e in batch["enc"]]
        enc[0][at[cell]] = word
        return not torch.allclose(hidden(enc)[at[watched]], base[at[watched]], atol=1e-6)

    assert changed((1, 1), (1, 0)) and changed((0, 0), (2, 0)) and changed((1, 1), (2, 1))  # row, header, column
    assert changed((2, 1), (1, 0)) == (attention == "full")  # another row and column
    assert changed((1, 0), (0, 1)) == (attention == "full")  # another column's cell, from a header
    first = hidden(list(batch["enc"]))[0]
    enc = [e.copy() for e in batch["enc"]]
    enc[0][at[(2, 1)]] = word
    assert not torch.allclose(hidden(enc)[0], first)  # [CLS] reads every cell
    # The second table, padded beside the first, reads as it does alone.
    torch.testing.assert_close(encoded(list(batch["enc"]), 1), encoded([batch["enc"][1]], 0, slice(1, 2)), atol=1e-5, rtol=1e-5)


def test_bad_stage_configs_name_the_field(tiny_artifact):
    from granite_ray.config import ConfigError

    with pytest.raises(ConfigError, match="data.negatives"):
        load_config(DistillConfig, None, [f"model.init_from={tiny_artifact}", "data.datasets=[x]"])
    with pytest.raises(ConfigError, match="grad_cache_chunk"):
        load_config(ContrastiveConfig, None, [f"model.init_from={tiny_artifact}", "data.datasets=[x]",
                                              "grad_cache_chunk=4", "train.sharding=deepspeed"])
    with pytest.raises(ConfigError, match="tables"):
        load_config(RetroMAEConfig, None, ["stage=tabular-retromae", f"model.init_from={tiny_artifact}"])


def test_conversational_adaptation_from_s3_artifact_to_s3_artifact(ray_local, s3, bucket, tmp_path, minilm_path):
    """Real mtrag conversations as queries, teacher scores from MiniLM itself, through the command that
    `jobs/adapt_conversations.py` runs (every jobs/ file runs that one CLI; tests/test_pipeline.py submits
    such jobs)."""
    from sentence_transformers import SentenceTransformer

    from granite_ray import storage
    from granite_ray.cli import main
    from granite_ray.data.conversations import format_conversation

    root = DATA / "mtrag_ibmcloud"
    docs = {r["_id"]: r["text"] for r in map(json.loads, (root / "corpus.jsonl").read_text().splitlines())}
    queries = {r["_id"]: r["conversation"] for r in map(json.loads, (root / "queries.jsonl").read_text().splitlines())}
    relevant = {}
    for line in (root / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, _ = line.split("\t")
        relevant.setdefault(q, d)
    teacher = SentenceTransformer(minilm_path, device="cpu")
    rng = random.Random(0)
    rows = []
    for q, d in sorted(relevant.items())[:48]:
        negs = [n for n in rng.sample(sorted(docs), 4) if n != d][:2]
        emb = teacher.encode([format_conversation(queries[q]), docs[d], *[docs[n] for n in negs]])
        rows.append({"query": queries[q], "pos": [docs[d]], "neg": [docs[n] for n in negs],
                     "pos_scores": [float(emb[0] @ emb[1])], "neg_scores": [float(emb[0] @ e) for e in emb[2:]]})
    storage.write_bytes(f"s3://{bucket}/conversations/rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    storage.publish_dir(minilm_path, f"s3://{bucket}/minilm")
    assert main(["adapt-conversations", f"model.init_from=s3://{bucket}/minilm",
                 f"data.datasets=[s3://{bucket}/conversations]", "data.negatives=2", "data.query_max_len=128",
                 "data.passage_max_len=128", "train.batch_size=8", "train.max_steps=6", "train.log_every=2",
                 "train.lr=5e-6", "train.optimizer=adamw", "train.cpus_per_worker=1", f"storage_path=s3://{bucket}/runs",
                 f"output_uri=s3://{bucket}/adapted", "run_name=conversations"]) == 0
    local = storage.download_dir(f"s3://{bucket}/adapted", tmp_path / "adapted")
    assert [json.loads(line)["step"] for line in (local / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]
    resolved = (local / "granite_ray.yaml").read_text()
    assert "stage: adapt-conversations" in resolved
    assert SentenceTransformer(str(local), device="cpu").encode(["|user|: how do I restrict IP access?"]).shape == (1, 384)
