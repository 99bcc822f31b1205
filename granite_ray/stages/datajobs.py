"""Model-made data as Ray Data jobs: table summaries and teacher scores, with vLLM in actor pools."""

from __future__ import annotations

import json

import numpy as np
import ray

from granite_ray import storage
from granite_ray.config import SummarizeTablesConfig, TeacherScoresConfig, dump_config
from granite_ray.data.corpus import DropCounter, read_record_lines, resolve_files
from granite_ray.data.pairs import scoring_rows
from granite_ray.data.tables import BAD_TABLE, read_tables
from granite_ray.inference.llm import SummarizeTables, TeacherEmbedder, actor_resources, resolved_backend
from granite_ray.runtime import init_ray, log


def run_summarize_tables(config: SummarizeTablesConfig) -> str:
    """Tables -> parquet rows of table + LLM summary (+ parsed title, columns, key facts)."""
    init_ray(config)  # first: it exports the config's S3 settings
    storage.begin_output(config.output_uri, dump_config(config).encode())
    counter = DropCounter.remote()
    backend = resolved_backend(config.llm)
    summaries = read_tables(config.tables, counter).map_batches(
        SummarizeTables, batch_size=config.llm.batch_size, compute=ray.data.ActorPoolStrategy(size=config.llm.replicas),
        fn_constructor_kwargs={"llm_config": config.llm.model_dump(), "backend": backend,
                               "max_tokens": config.max_tokens, "temperature": config.temperature,
                               "repetition_penalty": config.repetition_penalty},
        **actor_resources(config.llm))
    fs, path = storage.resolve(storage.join(config.output_uri, "summaries"))
    summaries.write_parquet(path, filesystem=fs)
    storage.commit_output(config.output_uri)
    # A table that does not parse is shown with why (its file:line: the parser's message); a line that
    # is no JSON record with its reason.
    rejected = [row if reason == BAD_TABLE else f"{row}: {reason}"
                for reason, rows in ray.get(counter.examples.remote()).items() for row in rows]
    written = sum(pq_rows for pq_rows in _parquet_row_counts(storage.join(config.output_uri, "summaries")))
    stats = {"tables_summarized": written, "tables_rejected": len(rejected), "rejected": rejected[:100],
             "backend": backend, "model": config.llm.model}
    for reason in stats["rejected"][:5]:
        log(f"skipped a table: {reason}")
    storage.add_to_output(config.output_uri, "stats.json", json.dumps(stats, indent=2).encode())
    log(f"{written} table summaries written to {config.output_uri}/summaries ({stats['tables_rejected']} tables skipped)")
    return config.output_uri


def _parquet_row_counts(uri: str) -> list[int]:
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(uri)
    return [pq.ParquetFile(fs.open_input_file(storage.bare_path(f))).metadata.num_rows
            for f in storage.list_files(uri) if f.endswith(".parquet")]


def run_teacher_scores(config: TeacherScoresConfig) -> str:
    """{query, pos, neg} rows -> the same rows with pos_scores and neg_scores from the teacher."""
    init_ray(config)  # first: it exports the config's S3 settings
    storage.begin_output(config.output_uri, dump_config(config).encode())
    backend = resolved_backend(config.llm)
    scored = read_record_lines(resolve_files([config.input_uri], field="input_uri")).map_batches(
        scoring_rows, batch_size=None, num_cpus=0.25,
        fn_kwargs={"with_scores": config.input_scores_weight > 0, "with_ids": backend == "bm25"}).map_batches(
        TeacherEmbedder, batch_size=config.llm.batch_size, compute=ray.data.ActorPoolStrategy(size=config.llm.replicas),
        fn_constructor_kwargs={"llm_config": config.llm.model_dump(), "backend": backend, "pooling": config.pooling,
                               "query_template": config.query_template, "task": config.task, "vector_cache": config.vector_cache,
                               "input_scores_weight": config.input_scores_weight, "scores_scale": config.scores_scale},
        **actor_resources(config.llm))
    fs, path = storage.resolve(storage.join(config.output_uri, "scores"))
    scored.write_json(path, filesystem=fs)
    storage.commit_output(config.output_uri)
    columns = ["rows", "rows_with_negatives", "positive_first"]
    counts = read_record_lines(resolve_files([storage.join(config.output_uri, "scores")], field="output_uri")).map_batches(
        positive_first_counts, batch_size=None, num_cpus=0.25).sum(columns) or {}  # None: no rows
    stats = {**{c: int(counts.get(f"sum({c})", 0)) for c in columns}, "model": config.llm.model}
    storage.add_to_output(config.output_uri, "stats.json", json.dumps(stats, indent=2).encode())
    share = stats["positive_first"] / max(stats["rows_with_negatives"], 1)
    log(f"teacher scores written to {config.output_uri}/scores; the teacher scores the positive above every negative in "
        f"{stats['positive_first']} of {stats['rows_with_negatives']} rows with negatives ({share:.1%})")
    return config.output_uri


def positive_first_counts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Whether the teacher puts a row's best positive above all its negatives: distilling helps only a student
    that does so less often on the same rows (score them with the student as teacher to compare)."""
    rows = [json.loads(line) for line in batch["line"]]
    ranked = [bool(r["neg_scores"]) for r in rows]
    first = [bool(r["neg_scores"]) and max(r["pos_scores"]) > max(r["neg_scores"]) for r in rows]
    return {"rows": np.ones(len(rows), dtype=np.int64), "rows_with_negatives": np.array(ranked, dtype=np.int64),
            "positive_first": np.array(first, dtype=np.int64)}
