"""Training rows for the embedding stages: FlagEmbedding-style {query, pos, neg[, pos_scores, neg_scores]}.

Rows are read as raw lines (jsonl/parquet, local or s3://), validated, and tokenized in a Ray
Data actor into framed token ids ("[CLS] prompt+text [SEP]" or whatever the model's tokenizer
puts around a text), truncated to the query and passage budgets. Each row keeps exactly
`negatives` hard negatives (cycled when it has fewer), so every worker's batch has one shape.
A conversation query (a list of {speaker, text} turns) is written most recent turn first, so
truncation at the end drops the oldest turns (Granite R2, conversational adaptation).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import ray
from tokenizers import Tokenizer

from granite_ray.config import PairDataConfig, PassageConfig, split_label
from granite_ray.data.conversations import format_conversation
from granite_ray.data.corpus import DropCounter, object_column, read_record_lines, resolve_files
from granite_ray.data.passages import best_passages
from granite_ray.data.rows import RowError, parse_lines
from granite_ray.tokenizer import CHARS_PER_TOKEN_BOUND, cut_to_tokens


def query_text(query) -> str:
    if isinstance(query, str):
        return query
    if isinstance(query, list) and query:
        return format_conversation(query)
    raise RowError("query must be a string or a non-empty list of {speaker, text} turns")


def _texts(value, field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise RowError(f"{field} must be a string or a list of strings")


def _scores(value, count: int, field: str) -> list[float]:
    if not isinstance(value, list) or len(value) != count or not all(isinstance(v, (int, float)) for v in value):
        raise RowError(f"{field} must be a list of {count} numbers, one per candidate")
    return [float(v) for v in value]


def cycled(items: list, n: int) -> list:
    """Exactly n items: the first n, or the list repeated (FlagEmbedding's rule)."""
    return [items[i % len(items)] for i in range(n)] if items else []


def parse_pair(record: dict, negatives: int, with_scores: bool, teacher_margin: float | None = None) -> dict:
    """One row -> {query, pos, negs[, scores]}: the first positive and `negatives` negatives, those the
    teacher scores at or above `teacher_margin` of the positive left out."""
    if not isinstance(record, dict):
        raise RowError("a row must be a JSON object")
    if "query" not in record or "pos" not in record:
        raise RowError(f"a row needs query and pos, got {sorted(record)}")
    positives = _texts(record["pos"], "pos")
    if not positives:
        raise RowError("pos is empty")
    negs = _texts(record.get("neg", []), "neg")
    out = {"query": query_text(record["query"]), "pos": positives[0]}
    picked = list(range(len(negs)))
    if with_scores or teacher_margin:
        pos_scores = _scores(record.get("pos_scores"), len(positives), "pos_scores")
        neg_scores = _scores(record.get("neg_scores"), len(negs), "neg_scores")
        if teacher_margin:
            picked = [i for i in picked if neg_scores[i] < teacher_margin * pos_scores[0]]
            if negs and not picked:
                raise RowError("every negative within teacher_margin of the positive")
    if negatives:
        if not picked:
            raise RowError("no negatives")
        picked = cycled(picked, negatives)
        out["negs"] = [negs[i] for i in picked]
    if with_scores:
        out["scores"] = [pos_scores[0]] + [neg_scores[i] for i in picked]
    return out


class TokenizePairs:
    """Ray Data actor: raw lines -> framed token ids of query, positive and negatives."""

    def __init__(self, tokenizer_json: str, frame: tuple[list[int], list[int]], config: dict, with_scores: bool,
                 counter) -> None:
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.prefix, self.suffix = frame
        self.config = PairDataConfig(**config)
        self.with_scores = with_scores
        self.counter = counter

    def _encode(self, texts: list[str], prompt: str, max_len: int) -> list[np.ndarray]:
        room = max_len - len(self.prefix) - len(self.suffix)
        encodings = self.tokenizer.encode_batch_fast([prompt + t[:room * CHARS_PER_TOKEN_BOUND] for t in texts],
                                                     add_special_tokens=False)
        return [np.array(self.prefix + e.ids[:room] + self.suffix, dtype=np.int32) for e in encodings]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.config
        rows = parse_lines(batch, lambda r, _: parse_pair(r, cfg.negatives, self.with_scores, cfg.teacher_margin), self.counter)
        out = {
            "query": object_column(self._encode([r["query"] for r in rows], cfg.query_prompt or "", cfg.query_max_len)),
            "pos": object_column(self._encode([r["pos"] for r in rows], cfg.passage_prompt or "", cfg.passage_max_len)),
        }
        n = cfg.negatives
        if n:
            flat = self._encode([t for r in rows for t in r["negs"]], cfg.passage_prompt or "", cfg.passage_max_len)
            out["negs"] = object_column([flat[i * n:(i + 1) * n] for i in range(len(rows))])
        if self.with_scores:
            out["scores"] = np.array([r["scores"] for r in rows], dtype=np.float32).reshape(len(rows), 1 + n)
        return out


def teacher_ordered(record: dict) -> dict:
    """The row with its negatives sorted by the teacher's scores, best first (when it has them)."""
    negs, scores = record.get("neg"), record.get("neg_scores")
    if isinstance(negs, list) and isinstance(scores, list) and len(negs) == len(scores) and \
            all(isinstance(v, (int, float)) for v in scores):
        order = sorted(range(len(negs)), key=lambda i: -scores[i])
        record = {**record, "neg": [negs[i] for i in order], "neg_scores": [scores[i] for i in order]}
    return record


class TokenizeLists:
    """Ray Data actor: raw lines -> "[CLS] query [SEP] passage [SEP]" pairs (ids and token types) for
    the positive and `negatives` negatives in teacher-score order: the reranker's ranked lists.
    With `passages`, each candidate is first cut to its window that best matches the query."""

    def __init__(self, tokenizer_json: str, config: dict, max_length: int, passages: dict | None, counter) -> None:
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length, strategy="only_second")
        self.queries = Tokenizer.from_str(tokenizer_json)  # unpadded, untruncated: where a long query's 64th token ends
        self.queries.no_padding()
        self.queries.no_truncation()
        self.max_length = max_length
        self.config = PairDataConfig(**config)
        self.passages = PassageConfig(**passages) if passages else None
        self.counter = counter

    def _passage(self, query: str, text: str) -> str:
        if not self.passages:
            return text
        return best_passages(query, text, self.passages.words, self.passages.overlap_words)[0]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.config
        rows = parse_lines(batch, lambda r, _: parse_pair(teacher_ordered(r), cfg.negatives, False, cfg.teacher_margin), self.counter)
        queries = [(cfg.query_prompt or "") + r["query"] for r in rows]
        # The query cap of R2's reranker (64 tokens): the passage keeps the rest of the pair's length.
        offsets = [e.offsets for e in self.queries.encode_batch(queries, add_special_tokens=False)]  # _fast has no offsets
        listed = [cut_to_tokens(q, o, cfg.query_max_len) for q, o in zip(queries, offsets) for _ in range(1 + cfg.negatives)]
        cut = self.max_length * CHARS_PER_TOKEN_BOUND
        passages = [(cfg.passage_prompt or "") + self._passage(r["query"], p)[:cut] for r in rows for p in [r["pos"], *r["negs"]]]
        encodings = self.tokenizer.encode_batch_fast(list(zip(listed, passages)))
        n = 1 + cfg.negatives
        ids = [np.array(e.ids, dtype=np.int32) for e in encodings]
        types = [np.array(e.type_ids, dtype=np.int8) for e in encodings]
        return {"pairs": object_column([ids[i * n:(i + 1) * n] for i in range(len(rows))]),
                "types": object_column([types[i * n:(i + 1) * n] for i in range(len(rows))])}


def _scoring_row(record, where: str, with_scores: bool = False, with_ids: bool = False) -> dict:
    if not isinstance(record, dict) or not isinstance(record.get("query"), str) or not isinstance(record.get("pos"), list) \
            or not isinstance(record.get("neg", []), list):
        raise RowError("a row needs query (string), pos and neg (lists of strings)")
    row = {"query": record["query"], "pos": [str(p) for p in record["pos"]], "neg": [str(n) for n in record.get("neg", [])]}
    if with_scores:
        scores = [record.get("pos_scores"), record.get("neg_scores", [])]
        if not all(isinstance(s, list) and len(s) == len(row[k]) for s, k in zip(scores, ("pos", "neg"))):
            raise RowError("an earlier teacher's scores are averaged in, but this row has no pos_scores and neg_scores "
                           "one per passage (input_uri should be a teacher-scores output)")
        row["prior_scores"] = [float(s) for s in scores[0] + scores[1]]
    if with_ids:
        ids = [record.get("pos_ids"), record.get("neg_ids", [])]
        if not all(isinstance(i, list) and len(i) == len(row[k]) for i, k in zip(ids, ("pos", "neg"))):
            raise RowError("a BM25 teacher scores the documents a row names, but this row has no pos_ids and neg_ids "
                           "one per passage (input_uri should be a mine-negatives output)")
        row["ids"] = [str(i) for i in ids[0] + ids[1]]
    return row


def scoring_rows(batch: dict[str, np.ndarray], with_scores: bool = False, with_ids: bool = False) -> dict[str, np.ndarray]:
    """Raw record lines -> {query, pos, neg} for a teacher to score, with `prior_scores` (the row's earlier
    teacher's, positives first) when `with_scores` and `ids` (the candidates' document ids, positives first)
    when `with_ids`; a malformed row fails the job with its file and line (scores must cover every row the
    next stage trains on)."""
    rows = parse_lines(batch, partial(_scoring_row, with_scores=with_scores, with_ids=with_ids))
    columns = {"query": np.array([r["query"] for r in rows], dtype=object),
               "pos": object_column([r["pos"] for r in rows]), "neg": object_column([r["neg"] for r in rows])}
    for extra, wanted in (("prior_scores", with_scores), ("ids", with_ids)):
        if wanted:
            columns[extra] = object_column([r[extra] for r in rows])
    return columns


def read_pairs(config: PairDataConfig, tokenize: type, tokenize_args: tuple) -> tuple[dict[str, ray.data.Dataset], dict[str, int], object]:
    """One tokenized Dataset per named dataset (`tokenize` actor built with `tokenize_args` + the drop
    counter), their row counts, and the drop counter."""
    counter = DropCounter.remote()
    datasets, sizes = {}, {}
    for entry in config.datasets:
        name, uri = split_label(entry)
        if name in datasets:
            raise ValueError(f"data.datasets: two datasets named {name!r}; label them name=path")
        lines = read_record_lines(resolve_files([uri], field="data.datasets"), config.read_tasks)
        if config.max_rows:
            lines = lines.limit(config.max_rows)
        tokenized = lines.map_batches(tokenize, batch_size=256, num_cpus=0.25,
                                      compute=ray.data.ActorPoolStrategy(size=config.tokenize_actors),
                                      fn_constructor_args=(*tokenize_args, counter))
        sizes[name] = lines.count()
        datasets[name] = cached_if_small(tokenized, sizes[name], config.cache_rows)
    return datasets, sizes, counter


def cached_if_small(ds: ray.data.Dataset, rows: int, cache_rows: int) -> ray.data.Dataset:
    """A small dataset tokenized once, in file order, for every epoch: streamed, each epoch would read
    it again and start its tokenizer actors again (about 20 s an epoch on 2 cores, for any size)."""
    if rows > cache_rows:
        return ds
    ds.context.execution_options.preserve_order = True  # the order stride sharding and resumes rely on
    return ds.materialize()


def sampling_weights(sizes: dict[str, int], power: float) -> dict[str, float]:
    """Probability of drawing a batch from each dataset: proportional to size**power."""
    raw = {name: n ** power for name, n in sizes.items() if n > 0}
    total = sum(raw.values())
    return {name: w / total for name, w in raw.items()}
