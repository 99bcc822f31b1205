"""`granite-ray pipeline` against a real `ray start --head`: a 3-stage tiny pipeline with its
artifacts on S3, a re-run that skips the completed stages, and a failing stage reported clearly."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from conftest import REPO, SAMPLE, assert_standard_loaders_agree
from raycluster import LocalHead

from granite_ray import storage
from granite_ray.cli import main
from granite_ray.config import PipelineConfig
from granite_ray.pipeline import PipelineError, PipelineRunner

ADI = REPO.parent / "shared" / "data" / "adi"


def _pipeline(output_uri: str, extra: list[dict] = ()) -> dict:
    return {
        "output_uri": output_uri, "python": sys.executable, "working_dir": str(REPO), "variables": {"corpus": str(SAMPLE)},
        "stages": [
            {"name": "tokenizer", "stage": "train-tokenizer",
             "overrides": ["data.paths=[${corpus}]", "data.text_fields=[title, text]", "tokenizer.vocab_size=8192"]},
            {"name": "mlm", "stage": "pretrain-mlm", "config": str(REPO / "configs" / "pretrain_mlm_tiny.yaml"),
             "overrides": ["tokenizer.path=${tokenizer}", "data.paths=[${corpus}]", "data.max_seq_len=128",
                           "train.max_steps=60", "train.log_every=10"]},
            {"name": "eval", "stage": "eval", "overrides": ["models=[${mlm}]", f"datasets=[{ADI}]"]},
            *extra,
        ]}


@pytest.fixture(scope="module")
def head(s3):
    """A head that does NOT inherit the S3 keys: jobs reach S3 only through the variables the runner forwards."""
    with LocalHead(num_cpus=2, env={k: "" for k in s3.env() if k.startswith("AWS_") and "KEY" in k}) as running:
        yield running


def test_pipeline_runs_chains_skips_and_reports_a_failed_stage(head, bucket, s3, capfd, tmp_path):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.address)
    output = f"s3://{bucket}/pipeline"
    run = PipelineRunner(PipelineConfig.model_validate(_pipeline(output))).run(head.address)
    printed = capfd.readouterr()
    assert run.ran == ["tokenizer", "mlm", "eval"] and run.skipped == []
    assert s3.env()["AWS_SECRET_ACCESS_KEY"] not in printed.out + printed.err  # forwarded, never printed
    assert "[mlm] " in printed.out and "[pipeline] eval (eval): succeeded" in printed.out  # job logs streamed

    manifest = json.loads(storage.read_bytes(f"{output}/manifest.json"))["stages"]
    assert {n: e["status"] for n, e in manifest.items()} == {"tokenizer": "succeeded", "mlm": "succeeded", "eval": "succeeded"}
    assert manifest["mlm"]["artifact"] == f"{output}/mlm" and manifest["mlm"]["inputs"] == ["tokenizer"]
    assert manifest["mlm"]["metrics"]["last_step"]["step"] == 60 and manifest["mlm"]["seconds"] > 0
    # Stage 1 as a Ray job learns on real text and writes an artifact the standard loaders agree on.
    metrics = [json.loads(line) for line in storage.read_bytes(f"{output}/mlm/metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics] == [10, 20, 30, 40, 50, 60]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0, metrics
    assert metrics[-1]["packing_efficiency"] > 0.95
    assert_standard_loaders_agree(storage.download_dir(f"{output}/mlm", tmp_path / "mlm"))
    assert json.loads(storage.read_bytes(f"{output}/mlm/data_stats.json"))["dropped_rows"] == {"empty_text": 2}  # 2 empty cranfield docs
    results = json.loads(storage.read_bytes(f"{output}/eval/results.json"))
    assert results["models"] == {"mlm": f"{output}/mlm"}  # the eval stage read the MLM stage's artifact
    assert manifest["eval"]["metrics"]["results"]["mlm"]["adi"]["ndcg_at_10"] == results["results"]["mlm"]["adi"]["ndcg_at_10"]
    resolved = yaml.safe_load(storage.read_bytes(manifest["mlm"]["config_uri"]))
    assert resolved["tokenizer"]["path"] == f"{output}/tokenizer" and resolved["train"]["max_steps"] == 60
    assert resolved["stage"] == "pretrain-mlm" and resolved["data"]["max_seq_len"] == 128
    assert yaml.safe_load(storage.read_bytes(manifest["tokenizer"]["config_uri"]))["data"]["paths"] == [str(SAMPLE)]
    jobs_before = len(client.list_jobs())

    again = PipelineRunner(PipelineConfig.model_validate(_pipeline(output))).run(head.address)
    assert again.ran == [] and again.skipped == ["tokenizer", "mlm", "eval"]
    assert len(client.list_jobs()) == jobs_before

    # A changed eval config re-runs eval alone; a stage that cannot succeed stops the pipeline and says why.
    failing = _pipeline(output, [{"name": "eval-dev", "stage": "eval",
                                  "overrides": ["models=[${mlm}]", f"datasets=[{ADI}]", "split=dev"]}])
    failing["stages"][2]["overrides"].append("top_k=50")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(failing))
    capfd.readouterr()
    assert main(["pipeline", "--config", str(path), "--address", head.address]) == 1
    err = capfd.readouterr().err
    assert "stage 'eval-dev' (eval) failed" in err and "split 'dev' not found" in err and "splits present: ['test']" in err
    manifest = json.loads(storage.read_bytes(f"{output}/manifest.json"))["stages"]
    assert manifest["eval-dev"]["status"] == "failed" and "split 'dev'" in manifest["eval-dev"]["error"]
    assert manifest["eval"]["status"] == "succeeded" and len(client.list_jobs()) == jobs_before + 2  # eval again, eval-dev


def test_pipeline_errors_before_any_job(head, tmp_path):
    """A bad override or a reference to a later stage fails in validation, before anything is submitted."""
    from ray.job_submission import JobSubmissionClient

    jobs_before = len(JobSubmissionClient(head.address).list_jobs())
    typo = _pipeline(str(tmp_path / "out"))
    typo["stages"][1]["overrides"].append("train.max_stepz=3")
    with pytest.raises(PipelineError, match=r"(?s)stage .mlm. \(pretrain-mlm\).*train.max_stepz: Extra inputs"):
        PipelineRunner(PipelineConfig.model_validate(typo)).run(head.address)
    forward = _pipeline(str(tmp_path / "out"))
    forward["stages"][1]["overrides"].append("model.init_from=${eval}")
    with pytest.raises(PipelineError, match=r"\$\{eval\} names a later stage"):
        PipelineRunner(PipelineConfig.model_validate(forward))
    unknown = _pipeline(str(tmp_path / "out"))
    unknown["stages"][0]["stage"] = "pretrain-mlmm"
    with pytest.raises(PipelineError, match="unknown stage 'pretrain-mlmm'"):
        PipelineRunner(PipelineConfig.model_validate(unknown))
    assert len(JobSubmissionClient(head.address).list_jobs()) == jobs_before


def test_a_serve_stage_key_goes_to_the_job_environment_never_into_its_config_file(tmp_path, monkeypatch):
    from granite_ray.config import API_KEY_ENV, ServeConfig, dump_config, load_config
    from granite_ray.pipeline import resolve_stages, with_api_key

    config = load_config(ServeConfig, None, ["embedder=/models/minilm", "api_key=s3cret-key-123"])
    assert config.api_key.get_secret_value() == "s3cret-key-123"
    assert "s3cret-key-123" not in dump_config(config) and "s3cret-key-123" not in repr(config)
    assert ServeConfig.model_validate(__import__("yaml").safe_load(dump_config(config))).api_key is None  # the job reads the env
    # A pipeline file holding the key itself is refused: files get committed. The key comes from the environment.
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    for written in ("api_key=s3cret-key-123", " api_key =s3cret-key-123", "api_key=${key}"):
        literal = {"output_uri": str(tmp_path / "out"), "variables": {"key": "s3cret-key-123"}, "stages": [
            {"name": "api", "stage": "serve", "overrides": ["embedder=/models/minilm", written]}]}
        with pytest.raises(PipelineError, match=f"stage 'api': a pipeline file must not hold an api_key; set {API_KEY_ENV}"):
            resolve_stages(PipelineConfig.model_validate(literal))
    pipeline = PipelineConfig.model_validate({"output_uri": str(tmp_path / "out"), "stages": [
        {"name": "api", "stage": "serve", "overrides": ["embedder=/models/minilm"]},
        {"name": "ranker", "stage": "train-reranker", "overrides": ["model.init_from=/models/minilm", "data.datasets=[/rows]", "data.negatives=3"]}]})
    monkeypatch.setenv(API_KEY_ENV, "s3cret-key-123")
    keyed, plain = resolve_stages(pipeline)
    assert keyed.api_key == "s3cret-key-123" and plain.api_key is None  # only a serve stage gets it
    assert "s3cret-key-123" not in keyed.config_yaml + repr(keyed)
    env, secrets = with_api_key(keyed, {"TOKENIZERS_PARALLELISM": "false"}, ["other-secret"])
    assert env[API_KEY_ENV] == "s3cret-key-123" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert "s3cret-key-123" in secrets and "other-secret" in secrets  # masked in the streamed job logs
    assert with_api_key(plain, {}, []) == ({}, [])


def test_ctrl_c_stops_the_running_job_marks_the_stage_and_ends_in_one_line(head, tmp_path, minilm_path):
    import signal
    import subprocess
    import time

    from ray.job_submission import JobSubmissionClient

    output = tmp_path / "out"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_uri": str(output), "python": sys.executable, "working_dir": str(REPO), "stages": [
        {"name": "eval", "stage": "eval", "overrides": [f"models=[{minilm_path}]", f"datasets=[{REPO.parent / 'shared' / 'data' / 'cranfield'}]"]}]}))
    proc = subprocess.Popen([sys.executable, "-m", "granite_ray.cli", "pipeline", "--config", str(path), "--address", head.address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    for line in proc.stdout:  # until the eval job is running
        lines.append(line)
        if "Running entrypoint for job eval-" in line:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    text = "".join(lines) + rest
    assert proc.returncode == 130, text
    assert text.strip().splitlines()[-1] == "granite-ray pipeline: interrupted" and "Traceback" not in text, text
    stage = json.loads((output / "manifest.json").read_text())["stages"]["eval"]
    assert stage["status"] == "stopped"
    client = JobSubmissionClient(head.address)
    deadline = time.time() + 60
    while str(client.get_job_status(stage["job_id"])) != "STOPPED" and time.time() < deadline:
        time.sleep(1)
    assert str(client.get_job_status(stage["job_id"])) == "STOPPED"


def test_job_logs_mask_a_secret_the_stream_cuts_in_two(capsys):
    """Ray streams job logs in chunks that can end mid-line, so mid-secret: lines are shown whole, masked."""
    from granite_ray.pipeline import JobLogs

    logs = JobLogs("api", ["s3cret-key-123"])
    for chunk in ("starting\nkey is s3cr", "et-key-123 here\nserving at http://127.0.0.1:8000 (Prometheus", ")\nbye s3cret-", "key-123"):
        logs.feed(chunk)
    logs.flush()
    out = capsys.readouterr().out
    assert "s3cret" not in out and "s3cr" not in out.replace("***", "")
    assert out.splitlines() == ["[api] starting", "[api] key is *** here", "[api] serving at http://127.0.0.1:8000 (Prometheus)",
                                "[api] bye ***"]
    assert logs.serving_url == "http://127.0.0.1:8000" and list(logs.tail)[-1] == "bye ***"


@pytest.mark.unit
def test_an_included_pipeline_runs_first_and_its_variables_are_defaults_the_file_and_cli_override(tmp_path):
    from granite_ray.config import ConfigError, load_config

    base = {"variables": {"data": "/d", "dataset": "${data}/one", "steps": "60"},
            "stages": [{"name": "split", "stage": "split-queries", "overrides": ["dataset=${dataset}"]}]}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump({
        "include": str(tmp_path / "base.yaml"), "variables": {"steps": "8"},
        "stages": [{"name": "eval", "stage": "eval", "overrides": ["models=[m]", "datasets=[${split}]"]}]}))
    config = load_config(PipelineConfig, tmp_path / "demo.yaml", ["variables.data=/elsewhere"])
    assert [s.name for s in config.stages] == ["split", "eval"]
    # The file overrides the included default; the CLI's `data` moves the variable built from it.
    assert config.variables == {"data": "/elsewhere", "dataset": "/elsewhere/one", "steps": "8"}
    (tmp_path / "clash.yaml").write_text(yaml.safe_dump({"include": str(tmp_path / "base.yaml"), "stages": base["stages"]}))
    with pytest.raises(ConfigError, match=r"stages: names \['split'\] repeat"):
        load_config(PipelineConfig, tmp_path / "clash.yaml")
    (tmp_path / "lost.yaml").write_text(yaml.safe_dump({"include": str(tmp_path / "nowhere.yaml"), "stages": base["stages"]}))
    with pytest.raises(ConfigError, match="nowhere.yaml: no such config file"):
        load_config(PipelineConfig, tmp_path / "lost.yaml")
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"include": str(tmp_path / "loop.yaml"), "stages": base["stages"]}))
    with pytest.raises(ConfigError, match="loop.yaml includes itself"):
        load_config(PipelineConfig, tmp_path / "loop.yaml")
