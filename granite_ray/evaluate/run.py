"""`granite-ray eval`: models x datasets -> NDCG@10, Recall@100, MRR@10; JSON, markdown, PNG.

Engine `ray` (default): queries and the streamed corpus go through one Ray Data pool of encoder
actors; only ids and embeddings come back to the driver, then an exact blocked top-k search and
trec_eval-convention metrics. A sparse (SPLADE) model's texts come back as their non-zero terms
and are searched through an inverted index; its results add the average non-zero terms. Engine `mteb`: `mteb.evaluate` with our encoder, for BEIR folders
and for mteb hub tasks by name.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from dataclasses import replace

import numpy as np

from granite_ray import storage
from granite_ray.config import ConfigError, EvalConfig, dump_config, split_label
from granite_ray.evaluate.beir import BeirDataset, check_qrels_against_corpus, load_beir
from granite_ray.evaluate.encoding import TAG, encode_dataset, iter_corpus, start_encoding
from granite_ray.evaluate.inverted_index import InvertedIndex
from granite_ray.evaluate.metrics import retrieval_scores
from granite_ray.evaluate.search import top_k
from granite_ray.inference.fusion import standardised
from granite_ray.runtime import log

METRICS = ("ndcg_at_10", "recall_at_5", "recall_at_100", "mrr_at_10")


def evaluate_beir(model_uri: str, dataset: BeirDataset, config: EvalConfig, in_driver: bool, label: str = "",
                  tuning: BeirDataset | None = None) -> dict:
    """Metrics of one model on one dataset's split; reranked too when the reranker is for this model, its weight
    chosen on `tuning`'s queries (another split, searched with the same corpus encoding) when given."""
    started = time.perf_counter()
    reranking = bool(config.reranker) and (config.reranked_models is None or label in config.reranked_models)
    searched = replace(dataset, queries=dataset.queries | tuning.queries) if reranking and tuning else dataset
    query_ids, queries, doc_ids, docs = encode_dataset(model_uri, searched, config, in_driver)
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError(f"{dataset.corpus_uri}: document ids are not unique")
    check_qrels_against_corpus(dataset, set(doc_ids))
    encoded = time.perf_counter()
    extra = {}
    if isinstance(docs, tuple):  # sparse: (term ids, weights) per text
        scores, index, extra = sparse_search(queries, docs, config.top_k)
        log(f"{dataset.name}: non-zero terms per query {extra['query_nonzeros']:.1f}, per document "
            f"{extra['doc_nonzeros']:.1f}", TAG)
    else:
        scores, index = top_k(queries, docs, config.top_k)
    run = {q: {doc_ids[j]: float(s) for s, j in zip(scores[i], index[i])} for i, q in enumerate(query_ids)}
    result = retrieval_scores(dataset.qrels, run) | extra
    result.update(documents=len(doc_ids), encode_seconds=encoded - started, search_seconds=time.perf_counter() - encoded)
    if reranking:
        reranker_scores = rerank_scores(run, searched, config, in_driver)
        weight, tuned = config.rerank_weight, {}
        if tuning:
            tuned = {w: retrieval_scores(tuning.qrels, fuse(run, reranker_scores, w, tuning.queries))["ndcg_at_10"]
                     for w in WEIGHT_GRID}
            weight = max(reversed(WEIGHT_GRID), key=tuned.get)  # ties: the larger share for the reranker
            log(f"{dataset.name}: reranker weight {weight} chosen on {len(tuning.queries)} {tuning.split} queries "
                f"(NDCG@10 {tuned[weight]:.4f}; reranker alone {tuned[1.0]:.4f}, retriever alone {tuned[0.0]:.4f})", TAG)
        reranked = fuse(run, reranker_scores, weight, dataset.queries)
        result["reranked"] = {**retrieval_scores(dataset.qrels, reranked), "reranker": config.reranker,
                              "top_k": config.rerank_top_k, "weight": weight}
        if tuned:
            result["reranked"]["weight_chosen_on"] = {"split": tuning.split, "queries": len(tuning.queries),
                                                      "ndcg_at_10": {f"{w:.1f}": v for w, v in tuned.items()}}
        log(f"{dataset.name}: NDCG@10 {result['ndcg_at_10']:.4f} -> {result['reranked']['ndcg_at_10']:.4f} after reranking "
            f"the top {config.rerank_top_k}", TAG)
    return result


def sparse_search(queries: tuple[list, list], docs: tuple[list, list], k: int) -> tuple[list, list, dict]:
    """Top-k of each query through an inverted index over the documents' terms; average non-zeros."""
    vocab_size = 1 + max((int(t.max()) for t in docs[0] + queries[0] if len(t)), default=0)
    index = InvertedIndex(*docs, vocab_size=vocab_size)
    hits = [index.search(terms, weights, k) for terms, weights in zip(*queries)]
    nonzeros = {"query_nonzeros": float(np.mean([len(t) for t in queries[0]])),
                "doc_nonzeros": float(np.mean([len(t) for t in docs[0]]))}
    return [h[0] for h in hits], [h[1] for h in hits], nonzeros


def rerank_scores(run: dict[str, dict[str, float]], dataset: BeirDataset, config: EvalConfig,
                  in_driver: bool) -> dict[str, dict[str, float]]:
    """The cross-encoder's score of each query's top rerank_top_k documents. With rerank_passages, a document
    scores as its best window among those that best match the query."""
    from granite_ray.data.passages import BM25Index, word_windows
    from granite_ray.inference.reranker import Reranker

    top = {q: sorted(docs, key=docs.get, reverse=True)[:config.rerank_top_k] for q, docs in run.items()}
    wanted = {d for ranked in top.values() for d in ranked}
    texts = {}
    for batch in iter_corpus(dataset, config, in_driver):
        texts.update((d, t) for d, t in zip(batch["id"], batch["text"]) if d in wanted)
    reranker = Reranker(config.reranker, config.rerank_max_length, query_max_length=config.rerank_query_max_length)
    passages = config.rerank_passages
    indexes = {d: BM25Index(word_windows(t, passages.words, passages.overlap_words)) for d, t in texts.items()} \
        if passages else {}
    pairs, owners = [], []
    for q, ranked in top.items():
        query = dataset.queries[q]
        for d in ranked:
            windows = indexes[d].best(query, passages.per_document) if passages else [texts[d]]
            pairs.extend((query, w) for w in windows)
            owners.extend([(q, d)] * len(windows))
    log(f"{dataset.name}: reranking {len(owners)} query-passage pairs", TAG)
    scores = reranker.score(pairs)
    reranked: dict[str, dict[str, float]] = {q: {} for q in top}
    for (q, d), s in zip(owners, scores):
        reranked[q][d] = max(float(s), reranked[q].get(d, -math.inf))
    return reranked


WEIGHT_GRID = tuple(i / 10 for i in range(11))


def fuse(run: dict[str, dict[str, float]], reranker_scores: dict[str, dict[str, float]], weight: float,
         queries) -> dict[str, dict[str, float]]:
    """The queries' reranked runs: each reranked document scores weight x the reranker's standardised score +
    (1 - weight) x the retriever's (score interpolation of a reranker with its first stage, as Pyserini's hybrid
    runs fuse two rankers); the documents below the reranked ones keep the retriever's order."""
    fused = {}
    for q in queries:
        reranked = list(reranker_scores[q])
        both = weight * standardised([reranker_scores[q][d] for d in reranked]) \
            + (1 - weight) * standardised([run[q][d] for d in reranked])
        fused[q] = dict(zip(reranked, both.tolist()))
        floor = min(fused[q].values(), default=0.0)
        rest = sorted((d for d in run[q] if d not in reranker_scores[q]), key=run[q].get, reverse=True)
        for rank, d in enumerate(rest):
            fused[q][d] = floor - 1.0 - rank
    return fused


def evaluate_mteb(model_uri: str, tasks: list, config: EvalConfig) -> dict[str, dict]:
    import mteb

    from granite_ray.evaluate.mteb_adapter import MtebEncoder

    model = MtebEncoder(model_uri, config.encoder)
    results = mteb.evaluate(model, tasks, cache=None, show_progress_bar=False)
    out = {}
    for task_result in results.task_results:
        scores = task_result.scores[config.split][0] if config.split in task_result.scores else {}
        out[task_result.task_name] = {"ndcg_at_10": scores.get("ndcg_at_10"), "recall_at_5": scores.get("recall_at_5"),
                                      "recall_at_100": scores.get("recall_at_100"),
                                      "mrr_at_10": scores.get("mrr_at_10"), "main_score": scores.get("main_score")}
    return out


RERANKED = " + reranker"


def systems(results: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """Every evaluated run by label: each model's, and "label + reranker" for its reranked run."""
    out: dict[str, dict[str, dict]] = {}
    for model, per_dataset in results.items():
        for name, scores in per_dataset.items():
            out.setdefault(model, {})[name] = scores
            if "reranked" in scores:
                out.setdefault(model + RERANKED, {})[name] = scores["reranked"]
    return out


def default_comparisons(labels: list[str], runs: dict[str, dict]) -> list[str]:
    pairs = [f"{label}:{labels[0]}" for label in labels[1:]]
    return pairs + [f"{label}{RERANKED}:{label}" for label in labels if label + RERANKED in runs]


def compare_systems(results: dict[str, dict[str, dict]], config: EvalConfig, metric: str = "ndcg_at_10") -> list[dict]:
    """Paired randomisation tests over queries, per dataset, of each "system:baseline" pair; a system that
    scores below its baseline is flagged `lower` (and logged)."""
    from granite_ray.evaluate.significance import paired_test

    runs = systems(results)
    pairs = config.compare if config.compare is not None else default_comparisons(list(results), runs)
    out = []
    for pair in pairs:
        system, _, baseline = pair.rpartition(":")
        missing = [s for s in (system, baseline) if s not in runs]
        if not system or missing:
            raise ConfigError(f"compare: {pair!r} names {missing or [pair]}, not among the evaluated runs {sorted(runs)}")
        for name in runs[system]:
            if name not in runs[baseline] or "per_query" not in runs[system][name]:
                continue
            a, b = runs[system][name]["per_query"][metric], runs[baseline][name]["per_query"][metric]
            queries = sorted(a)
            test = paired_test([a[q] for q in queries], [b[q] for q in queries], config.significance_trials)
            row = {"system": system, "baseline": baseline, "dataset": name, "metric": metric,
                   "system_score": runs[system][name][metric], "baseline_score": runs[baseline][name][metric],
                   **test, "lower": test["mean_difference"] < 0}
            out.append(row)
            verdict = "LOWERS" if row["lower"] else "raises"
            log(f"{system} {verdict} {metric} on {name} against {baseline}: {row['mean_difference']:+.4f} "
                f"(95% CI {row['ci_low']:+.4f} .. {row['ci_high']:+.4f}, p = {row['p_value']:.4f})", TAG)
    return out


def comparisons_table(comparisons: list[dict]) -> str:
    if not comparisons:
        return ""
    lines = ["| system | baseline | dataset | NDCG@10 | baseline NDCG@10 | difference | 95% CI | p (paired) | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        flag = "**lower**" if c["lower"] else ("significant" if c["p_value"] < 0.05 else "")
        lines.append(f"| {c['system']} | {c['baseline']} | {c['dataset']} | {c['system_score']:.4f} | {c['baseline_score']:.4f} | "
                     f"{c['mean_difference']:+.4f} | {c['ci_low']:+.4f} .. {c['ci_high']:+.4f} | {c['p_value']:.4f} | {flag} |")
    return "\n" + "\n".join(lines) + "\n"


def without_per_query(results: dict[str, dict[str, dict]]) -> tuple[dict, dict]:
    """(results without the per-query scores, the per-query scores by run and dataset)."""
    lean, per_query = {}, {}
    for run, per_dataset in systems(results).items():
        for name, scores in per_dataset.items():
            if "per_query" in scores:
                per_query.setdefault(run, {})[name] = scores["per_query"]
    for model, per_dataset in results.items():
        lean[model] = {}
        for name, scores in per_dataset.items():
            scores = {k: v for k, v in scores.items() if k != "per_query"}
            if "reranked" in scores:
                scores["reranked"] = {k: v for k, v in scores["reranked"].items() if k != "per_query"}
            lean[model][name] = scores
    return lean, per_query


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| model | dataset | NDCG@10 | Recall@5 | Recall@100 | MRR@10 |", "|---|---|---|---|---|---|"]
    for model, per_dataset in results.items():
        for name, scores in per_dataset.items():
            for label, row in [(model, scores)] + ([(f"{model} + reranker", scores["reranked"])] if "reranked" in scores else []):
                cells = [f"{row[m]:.4f}" if row.get(m) is not None else "-" for m in METRICS]
                lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart_png(results: dict[str, dict[str, dict]], comparisons: list[dict] = (), metric: str = "ndcg_at_10") -> bytes:
    """Bars of every run's metric per dataset; beside them, each paired comparison's difference with its
    95% interval and p-value (red: the system scores below its baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = systems(results)
    datasets = sorted({d for per in runs.values() for d in per})
    width = 0.8 / max(len(runs), 1)
    panels = 2 if comparisons else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(4, 1.6 * len(datasets) * max(len(runs), 1)) + 5 * (panels - 1), 3.8),
                             squeeze=False)
    ax = axes[0][0]
    for i, (run, per) in enumerate(runs.items()):
        values = [per.get(d, {}).get(metric) or 0.0 for d in datasets]
        bars = ax.bar(np.arange(len(datasets)) + i * width, values, width, label=run)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(np.arange(len(datasets)) + width * (len(runs) - 1) / 2, datasets)
    ax.set_ylabel(metric.replace("_at_", "@").upper())
    ax.legend(fontsize=7)
    if comparisons:
        ax = axes[0][1]
        y = np.arange(len(comparisons))[::-1]
        for row, c in zip(y, comparisons):
            color = "tab:red" if c["lower"] else "tab:green"
            ax.errorbar(c["mean_difference"], row, xerr=[[c["mean_difference"] - c["ci_low"]], [c["ci_high"] - c["mean_difference"]]],
                        fmt="o", color=color, capsize=3)
            ax.annotate(f"p={c['p_value']:.3g}", (c["ci_high"], row), xytext=(4, -3), textcoords="offset points", fontsize=7)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_yticks(y, [f"{c['system']} vs {c['baseline']} ({c['dataset']})" for c in comparisons], fontsize=7)
        ax.set_xlabel(f"difference in {metric.replace('_at_', '@').upper()}, 95% CI (paired)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def weight_split(dataset: BeirDataset, config: EvalConfig) -> BeirDataset | None:
    """The queries the reranker's weight is chosen on (rerank_weight_split), none of them an evaluated query."""
    if config.rerank_weight_split is None:
        return None
    tuning = load_beir(dataset.uri, config.rerank_weight_split, config.query_format)
    shared = sorted(set(tuning.queries) & set(dataset.queries))
    if shared:
        raise ConfigError(f"rerank_weight_split: {len(shared)} {tuning.split} queries are also {dataset.split} queries of "
                          f"{dataset.name} (e.g. {shared[0]}); the weight must be chosen on other queries")
    return tuning


def run_eval(config: EvalConfig) -> str:
    """Evaluate every model on every dataset; write results.json, results.md and ndcg_at_10.png."""
    storage.apply_storage_env(config.storage)  # first: the output and the datasets may be on S3
    storage.begin_output(config.output_uri, dump_config(config).encode())
    datasets = [load_beir(uri, config.split, config.query_format) for uri in config.datasets]  # fail on a bad folder before encoding
    tunings = [weight_split(d, config) for d in datasets]
    in_driver = start_encoding(config, [d.corpus_uri for d in datasets])
    labels, uris = zip(*(split_label(m) for m in config.models))
    if len(set(labels)) != len(labels):
        raise ConfigError(f"models: labels {list(labels)} repeat; name them as label=path")
    missing = [u for u in [*uris, *([config.reranker] if config.reranker else [])] if not storage.exists(u)]
    if missing:
        raise ConfigError(f"no such model: {', '.join(missing)}")
    unknown = sorted(set(config.reranked_models or ()) - set(labels))
    if unknown:
        raise ConfigError(f"reranked_models: {unknown} are not among the models' labels {list(labels)}")
    results: dict[str, dict[str, dict]] = {}
    for label, model_uri in zip(labels, uris):
        results[label] = {}
        if config.engine == "mteb":
            from granite_ray.evaluate.mteb_adapter import beir_task, hub_tasks

            tasks = [beir_task(d) for d in datasets] + hub_tasks(config.mteb_tasks)
            results[label] = evaluate_mteb(model_uri, tasks, config)
        else:
            if config.mteb_tasks:
                raise ConfigError("mteb_tasks need engine=mteb")
            for dataset, tuning in zip(datasets, tunings):
                log(f"{label} on {dataset.name} ({len(dataset.queries)} queries)", TAG)
                results[label][dataset.name] = evaluate_beir(model_uri, dataset, config, in_driver, label, tuning)
                log(f"{label} on {dataset.name}: " + ", ".join(f"{m} {results[label][dataset.name][m]:.4f}" for m in METRICS), TAG)
    comparisons = compare_systems(results, config) if config.engine == "ray" else []
    table = markdown_table(results) + comparisons_table(comparisons)
    results, per_query = without_per_query(results)
    storage.write_bytes(storage.join(config.output_uri, "results.json"),
                        json.dumps({"split": config.split, "models": dict(zip(labels, uris)), "results": results,
                                    "comparisons": comparisons}, indent=2).encode())
    storage.write_bytes(storage.join(config.output_uri, "per_query.json"), json.dumps(per_query).encode())
    storage.write_bytes(storage.join(config.output_uri, "results.md"), table.encode())
    storage.write_bytes(storage.join(config.output_uri, "ndcg_at_10.png"), bar_chart_png(results, comparisons))
    storage.commit_output(config.output_uri)
    sys.stdout.write(table)
    log(f"results written to {config.output_uri}", TAG)
    return config.output_uri
