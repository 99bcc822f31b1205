"""`granite-ray eval`: metrics against pytrec_eval, reference scores, mteb agreement, s3:// data, bad folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA

from granite_ray.config import EvalConfig, load_config
from granite_ray.evaluate.beir import DatasetError, load_beir
from granite_ray.evaluate.metrics import retrieval_scores


def _eval_config(tmp_path, models, datasets, *extra) -> EvalConfig:
    return load_config(EvalConfig, None, [f"models=[{','.join(models)}]", f"datasets=[{','.join(datasets)}]",
                                          f"output_uri={tmp_path / 'eval'}", "encode_actors=2", "cpus_per_actor=0.75",
                                          *extra])


def test_metrics_equal_pytrec_eval_on_the_same_run():
    import pytrec_eval

    qrels = load_beir(str(SHARED_DATA / "cranfield")).qrels  # graded relevance 1-4
    rng = np.random.default_rng(0)
    docs = [str(i) for i in range(1, 1401)]
    run = {}
    for q in qrels:
        picked = rng.choice(docs, size=150, replace=False)
        scores = np.round(rng.random(150), 2)  # rounding makes ties, broken by doc id as trec_eval does
        relevant = list(qrels[q])[:2]
        run[q] = {**{d: float(s) for d, s in zip(picked, scores)}, **{d: float(0.6 + 0.4 * rng.random()) for d in relevant}}
    run[next(iter(qrels))] = {}  # a query that retrieved nothing scores 0
    ours = retrieval_scores(qrels, run)
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.5", "recall.100"})
    top10 = {q: dict(sorted(r.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:10]) for q, r in run.items()}
    reference = evaluator.evaluate(run)
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    mean = lambda table, key: sum(table.get(q, {}).get(key, 0.0) for q in qrels) / len(qrels)  # noqa: E731
    assert ours["ndcg_at_10"] == pytest.approx(mean(reference, "ndcg_cut_10"), abs=1e-12)
    assert ours["recall_at_100"] == pytest.approx(mean(reference, "recall_100"), abs=1e-12)
    assert ours["recall_at_5"] == pytest.approx(mean(reference, "recall_5"), abs=1e-12)  # MT-RAG's metric
    assert ours["mrr_at_10"] == pytest.approx(mean(mrr, "recip_rank"), abs=1e-12)
    assert 0.05 < ours["ndcg_at_10"] < 0.95  # a run where the metric is not trivially 0 or 1


def test_all_minilm_reference_scores_with_several_encoder_actors(ray_local, tmp_path, minilm_path):
    from granite_ray.evaluate.run import run_eval

    config = _eval_config(tmp_path, [f"minilm={minilm_path}"], [str(SHARED_DATA / "cranfield"), str(SHARED_DATA / "humaneval")],
                          "encode_in=actors")  # the Ray Data pool; the mteb test below takes the in-driver path
    run_eval(config)
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]["minilm"]
    assert saved["cranfield"]["ndcg_at_10"] == pytest.approx(0.3817, abs=0.001)
    assert saved["humaneval"]["ndcg_at_10"] == pytest.approx(0.9524, abs=0.001)
    assert saved["cranfield"]["documents"] == 1400 and saved["humaneval"]["queries"] == 164
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| minilm | cranfield | 0.38" in table
    assert (tmp_path / "eval" / "ndcg_at_10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mteb_engine_agrees_and_data_reads_from_s3(ray_local, tmp_path, s3, bucket, minilm_path, capfd):
    from granite_ray.evaluate.run import run_eval

    client = s3.client()
    for path in (SHARED_DATA / "adi").rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"beir/adi/{path.relative_to(SHARED_DATA / 'adi')}")
    scores = {}
    for engine, dataset in (("ray", f"s3://{bucket}/beir/adi"), ("mteb", str(SHARED_DATA / "adi"))):  # ray: encoded in the driver
        config = _eval_config(tmp_path, [f"minilm={minilm_path}"], [dataset], f"engine={engine}",
                              f"output_uri=s3://{bucket}/eval-{engine}")
        run_eval(config)
        body = client.get_object(Bucket=bucket, Key=f"eval-{engine}/results.json")["Body"].read()
        scores[engine] = json.loads(body)["results"]["minilm"]["adi"]
    assert "adi: encoding in the driver" in capfd.readouterr().out  # auto: one node, a small corpus
    for metric in ("ndcg_at_10", "recall_at_100", "mrr_at_10"):
        assert scores["ray"][metric] == pytest.approx(scores["mteb"][metric], abs=1e-4)
    assert 0.3 < scores["ray"]["ndcg_at_10"] < 0.8


def _broken_copy(tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(SHARED_DATA / "adi", folder)
    return folder


@pytest.mark.job  # CLI processes
def test_one_machine_evaluates_and_mines_without_starting_ray_as_the_actor_pool_does(ray_local, tmp_path, minilm_path):
    """No cluster joined and a corpus that fits: eval and mine-negatives encode in their own process and
    start no Ray, with the scores and rows of the Ray Data pool."""
    from granite_ray.config import MineNegativesConfig
    from granite_ray.evaluate.run import run_eval
    from granite_ray.stages.mining import run_mine_negatives

    adi = str(SHARED_DATA / "adi")
    env = {**os.environ, "RAY_ADDRESS": ""}
    outputs = {}
    for stage, args in (("eval", [f"models=[minilm={minilm_path}]", f"datasets=[{adi}]"]),
                        ("mine-negatives", [f"dataset={adi}", "split=test", f"model={minilm_path}", "negatives=3"])):
        done = subprocess.run([sys.executable, "-m", "granite_ray.cli", stage, *args, f"output_uri={tmp_path / stage}"],
                              capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[stage] = done.stdout + done.stderr
        assert "adi: encoding in the driver" in outputs[stage] and "Started a local Ray instance" not in outputs[stage]
    run_eval(_eval_config(tmp_path, [f"minilm={minilm_path}"], [adi], "encode_in=actors", f"output_uri={tmp_path / 'pool-eval'}"))
    driver, pool = (json.loads((tmp_path / out / "results.json").read_text())["results"]["minilm"]["adi"]
                    for out in ("eval", "pool-eval"))
    for metric in ("ndcg_at_10", "recall_at_5", "mrr_at_10"):
        assert driver[metric] == pytest.approx(pool[metric], abs=1e-4)
    run_mine_negatives(load_config(MineNegativesConfig, None, [
        f"dataset={adi}", "split=test", f"model={minilm_path}", "negatives=3", "encode_in=actors", "cpus_per_actor=1",
        f"output_uri={tmp_path / 'pool-mine'}"]))
    driver, pool = (sorted((json.loads(line) for line in (tmp_path / out / "mined.jsonl").read_text().splitlines()),
                           key=lambda r: r["query_id"]) for out in ("mine-negatives", "pool-mine"))  # the pool returns queries in any order
    assert [(r["query_id"], r["pos_ids"], r["neg_ids"]) for r in driver] == [(r["query_id"], r["pos_ids"], r["neg_ids"]) for r in pool]
    assert [r["neg"] for r in driver] == [r["neg"] for r in pool] and len(driver) == 35


def test_missing_qrels_fails_before_any_work(tmp_path):
    folder = _broken_copy(tmp_path, "no-test-split")
    (folder / "qrels" / "test.tsv").rename(folder / "qrels" / "dev.tsv")
    with pytest.raises(DatasetError, match=r"qrels for split 'test' not found.*splits present: \['dev'\]"):
        load_beir(str(folder))
    done = subprocess.run([sys.executable, "-m", "granite_ray.cli", "eval", f"models=[{folder}]", f"datasets=[{folder}]"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "qrels for split 'test' not found" in done.stderr


def test_qrel_naming_an_unknown_document_fails_clearly(ray_local, tmp_path, tiny_artifact):
    from granite_ray.evaluate.run import run_eval

    folder = _broken_copy(tmp_path, "unknown-doc")
    with open(folder / "qrels" / "test.tsv", "a") as f:
        f.write("1\tno-such-doc\t1\n")
    with pytest.raises(DatasetError, match=r"names 1 document\(s\) missing from .*corpus.jsonl: no-such-doc"):
        run_eval(_eval_config(tmp_path, [tiny_artifact], [str(folder)]))
    bad_line = _broken_copy(tmp_path, "bad-query")
    with open(bad_line / "qrels" / "test.tsv", "a") as f:
        f.write("no-such-query\t1\t1\n")
    with pytest.raises(DatasetError, match=r"test.tsv:\d+: query 'no-such-query' is not in"):
        load_beir(str(bad_line))


def test_the_driver_encodes_long_documents_in_bounded_slices():
    """Every text once, in order; a slice holds at most `rows` texts and, unless it is one text, at most
    `characters` characters, so progress is reported a minute at a time on 50k-character meetings."""
    from granite_ray.evaluate.encoding import _bounded_slices

    texts = ["a" * n for n in (10, 60, 30, 200, 5, 5, 5, 5, 40)]
    slices = list(_bounded_slices(texts, rows=3, characters=100))
    assert [i for a, b in slices for i in range(a, b)] == list(range(len(texts)))
    for a, b in slices:
        assert b - a <= 3 and (b - a == 1 or sum(map(len, texts[a:b])) <= 100)
    assert (3, 4) in slices  # the 200-character text alone
    assert list(_bounded_slices([])) == [] and list(_bounded_slices(["x"] * 600)) == [(0, 256), (256, 512), (512, 600)]
