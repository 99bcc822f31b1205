"""`granite-ray pipeline --config pipeline.yaml [--address URL]`: stages as Ray jobs, chained by artifact URIs.

Every stage's config is resolved and validated before the first job starts, so a typo fails in
seconds, not hours in. Each stage then runs as a Ray job (`jobs/<stage>.py --config <resolved
yaml>`) submitted with `JobSubmissionClient`; its logs stream here. In overrides, `${name}` is the
artifact URI of the earlier stage `name`, or the pipeline's variable `name`. `<output_uri>/manifest.json`
records each stage's status, artifact URI, config hash, metrics and timings; a re-run skips the
stages that succeeded with the same config (and whose inputs did not run again). A serve stage
counts as done once it answers; its job keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from granite_ray import storage
from granite_ray.config import API_KEY_ENV, REFERENCE, PipelineConfig, PipelineStage, dump_config, load_config
from granite_ray.runtime import log

TAG = "pipeline"
SERVING = re.compile(r"serving at (\S+)")
LINE_END = re.compile(r"\r\n|\r|\n")  # as str.splitlines: progress bars redraw with a bare \r
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class PipelineError(RuntimeError):
    """A stage failed, or the pipeline file is wrong; the message names the stage and why."""


def job_script(stage: str) -> str:
    return f"jobs/{'evaluate' if stage == 'eval' else stage.replace('-', '_')}.py"


@dataclass
class ResolvedStage:
    spec: PipelineStage
    config_yaml: str
    artifact: str
    config_hash: str
    inputs: list[str]
    api_key: str | None = field(default=None, repr=False)  # a serve stage's key: the job's environment, never its config file

    @property
    def name(self) -> str:
        return self.spec.name


def resolve_stages(pipeline: PipelineConfig) -> list[ResolvedStage]:
    """Each stage's full config, `${name}` references replaced by earlier artifacts, validated now."""
    from granite_ray.stages.registry import STAGES

    resolved: dict[str, ResolvedStage] = {}
    for spec in pipeline.stages:
        if spec.stage not in STAGES:
            raise PipelineError(f"stage {spec.name!r}: unknown stage {spec.stage!r}; known: {', '.join(STAGES)}")
        if pipeline.working_dir and not (Path(pipeline.working_dir) / job_script(spec.stage)).exists():
            raise PipelineError(f"stage {spec.name!r}: {job_script(spec.stage)} is not in working_dir {pipeline.working_dir}")
        inputs = []

        def substitute(match: re.Match) -> str:
            ref = match.group(1)
            if ref in pipeline.variables:
                return pipeline.variables[ref]
            if ref not in resolved:
                later = any(s.name == ref for s in pipeline.stages)
                raise PipelineError(f"stage {spec.name!r}: ${{{ref}}} names {'a later' if later else 'no'} stage or variable; "
                                    f"earlier stages: {', '.join(resolved) or 'none'}")
            inputs.append(ref)
            return resolved[ref].artifact

        if any(o.split("=", 1)[0].strip() == "api_key" for o in spec.overrides):
            raise PipelineError(f"stage {spec.name!r}: a pipeline file must not hold an api_key; set {API_KEY_ENV} in the "
                                f"environment of `granite-ray pipeline`")
        defaults = [f"stage={spec.stage}", f"output_uri={storage.join(pipeline.output_uri, spec.name)}",
                    f"storage_path={storage.join(pipeline.output_uri, '_runs')}", f"run_name={spec.name}"]
        overrides = defaults + [REFERENCE.sub(substitute, o) for o in spec.overrides]
        try:
            config = load_config(STAGES[spec.stage].config_cls, spec.config, overrides)
        except Exception as err:  # ConfigError, a missing file: either way, before anything runs
            raise PipelineError(f"stage {spec.name!r} ({spec.stage}): {err}") from None
        config_yaml = dump_config(config)
        digest = hashlib.sha256(config_yaml.encode())
        for ref in inputs:
            digest.update(resolved[ref].config_hash.encode())
        key = config.api_key.get_secret_value() if getattr(config, "api_key", None) else None
        if spec.stage == "serve":
            key = key or os.environ.get(API_KEY_ENV) or None
        resolved[spec.name] = ResolvedStage(spec, config_yaml, config.output_uri, digest.hexdigest()[:16], sorted(set(inputs)), key)
    return list(resolved.values())


def with_api_key(stage: ResolvedStage, env_vars: dict[str, str], secrets: list[str]) -> tuple[dict[str, str], list[str]]:
    """A serve stage's api_key travels in its job's environment (the dumped config never holds it) and is
    masked in the streamed logs like every secret."""
    if not stage.api_key:
        return env_vars, secrets
    return {**env_vars, API_KEY_ENV: stage.api_key}, sorted({*secrets, stage.api_key}, key=len, reverse=True)


def artifact_metrics(uri: str) -> dict:
    """The figures a stage leaves beside its artifact: evaluation results, data-job stats, the last logged step."""
    out: dict = {}
    for name in ("results.json", "stats.json", "speed.json"):
        path = storage.join(uri, name)
        if storage.exists(path):
            data = json.loads(storage.read_bytes(path))
            out[name.removesuffix(".json")] = data.get("results", data) if name == "results.json" else data
    path = storage.join(uri, "metrics.jsonl")
    if storage.exists(path) and (lines := storage.read_bytes(path).decode().strip().splitlines()):
        out["last_step"] = json.loads(lines[-1])
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """`<output_uri>/manifest.json`, rewritten after every change so a crash loses nothing."""

    def __init__(self, output_uri: str) -> None:
        self.uri = storage.join(output_uri, "manifest.json")
        self.data = json.loads(storage.read_bytes(self.uri)) if storage.exists(self.uri) else {"stages": {}}

    def entry(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def update(self, name: str, **fields) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.data["updated"] = _now()
        storage.write_bytes(self.uri, json.dumps(self.data, indent=2).encode())


@dataclass
class JobLogs:
    """The job's log lines, streamed to stdout as they come, the last ones kept for error messages.
    Lines are shown whole, secrets masked: a chunk's unfinished last line waits for the next chunk,
    so a secret the log stream cuts in two is still masked."""

    name: str
    secrets: list[str]
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=60))
    serving_url: str | None = None
    pending: str = ""

    def feed(self, text: str) -> None:
        *lines, self.pending = LINE_END.split(self.pending + text)
        self._show(lines)

    def flush(self) -> None:
        """The last line, when the stream ended without a newline."""
        lines, self.pending = [self.pending] if self.pending else [], ""
        self._show(lines)

    def _show(self, lines: list[str]) -> None:
        for line in lines:
            for secret in self.secrets:
                line = line.replace(secret, "***")
            self.tail.append(line)
            if match := SERVING.search(line):
                self.serving_url = match.group(1)
            shown = line if len(line) <= 400 else line[:400] + " …"  # Ray Data's stats dicts run to pages
            sys.stdout.write(f"[{self.name}] {shown}\n")
        sys.stdout.flush()

    def follow(self, client, job_id: str) -> threading.Thread:
        async def tail() -> None:
            try:
                async for chunk in client.tail_job_logs(job_id):
                    self.feed(chunk)
            finally:
                self.flush()

        thread = threading.Thread(target=lambda: asyncio.run(tail()), daemon=True, name=f"logs-{self.name}")
        thread.start()
        return thread

    def reason(self) -> str:
        """The exception the job died of, else its last lines."""
        lines = [line for line in self.tail if line.strip()]
        errors = [i for i, line in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line.strip())
                  or line.startswith("granite-ray ")]
        return lines[errors[-1]].strip() if errors else "\n".join(lines[-15:])


@dataclass
class PipelineRun:
    manifest: dict
    ran: list[str]
    skipped: list[str]
    serving: dict[str, str]  # stage name -> URL of a serve stage left running
    head: object | None = None  # the embedded LocalRayHead, when this run started one

    def stop(self) -> None:
        if self.head is not None:
            self.head.stop()


class PipelineRunner:
    def __init__(self, pipeline: PipelineConfig) -> None:
        self.pipeline = pipeline
        self.stages = resolve_stages(pipeline)
        self.manifest = Manifest(pipeline.output_uri)

    def job_env(self) -> tuple[dict[str, str], list[str]]:
        forwarded = {k: os.environ[k] for k in self.pipeline.forward_env if os.environ.get(k)}
        secrets = sorted((v for k, v in forwarded.items() if any(w in k for w in ("SECRET", "TOKEN", "PASSWORD", "KEY"))),
                         key=len, reverse=True)
        return {**self.pipeline.env_vars, **forwarded}, secrets

    def runtime_env(self, env_vars: dict[str, str]) -> dict:
        runtime_env: dict = {"env_vars": env_vars}
        if self.pipeline.working_dir:
            runtime_env.update(working_dir=self.pipeline.working_dir, excludes=self.pipeline.excludes)
        return runtime_env

    def is_done(self, stage: ResolvedStage, ran: set[str], client) -> bool:
        entry = self.manifest.entry(stage.name)
        if not entry or entry.get("config_hash") != stage.config_hash or ran.intersection(stage.inputs):
            return False
        if entry.get("status") == "succeeded":
            return storage.is_complete(stage.artifact)
        if entry.get("status") == "serving":
            try:
                return str(client.get_job_status(entry["job_id"])) == "RUNNING"
            except Exception:  # the cluster that served it is gone
                return False
        return False

    def run(self, address: str | None = None) -> PipelineRun:
        from ray.job_submission import JobSubmissionClient

        for noisy in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",  # per-job upload chatter
                      "ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        address = address or self.pipeline.address or os.environ.get("RAY_ADDRESS")
        head = None
        if not address:
            from granite_ray.localray import LocalRayHead

            head = LocalRayHead(self.pipeline.num_cpus or os.cpu_count() or 2).start()
            address = head.address
            log(f"started an embedded Ray head at {address} (log {head.log_path})", TAG)
        python = self.pipeline.python or (sys.executable if head else "python")
        client = JobSubmissionClient(address)
        env_vars, secrets = self.job_env()
        log(f"{len(self.stages)} stages on {address}; manifest {self.manifest.uri}; passing "
            f"{', '.join(sorted(env_vars)) or 'no variables'} to each job (values not shown)", TAG)
        ran: list[str] = []
        skipped: list[str] = []
        serving: dict[str, str] = {}
        try:
            for stage in self.stages:
                if self.is_done(stage, set(ran), client):
                    entry = self.manifest.entry(stage.name)
                    if entry["status"] == "serving":
                        serving[stage.name] = entry["url"]
                    log(f"{stage.name} ({stage.spec.stage}): {entry['status']} before with this config; skipped "
                        f"(artifact {stage.artifact})", TAG)
                    skipped.append(stage.name)
                    continue
                url = self.run_stage(stage, client, python, env_vars, secrets)
                if url:
                    serving[stage.name] = url
                ran.append(stage.name)
        except BaseException:
            if head is not None:
                head.stop()
            raise
        return PipelineRun(self.manifest.data, ran, skipped, serving, head)

    def run_stage(self, stage: ResolvedStage, client, python: str, env_vars: dict[str, str], secrets: list[str]) -> str | None:
        spec = stage.spec
        config_uri = storage.join(self.pipeline.output_uri, "_configs", f"{stage.name}.yaml")
        env_vars, secrets = with_api_key(stage, env_vars, secrets)
        storage.write_bytes(config_uri, stage.config_yaml.encode())
        entrypoint = f"{python} {job_script(spec.stage)} --config {config_uri}"
        started = time.time()
        job_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=self.runtime_env(env_vars),
            submission_id=f"{stage.name}-{stage.config_hash[:8]}-{int(started)}",
            entrypoint_num_cpus=spec.num_cpus or None, entrypoint_num_gpus=spec.num_gpus or None,
            entrypoint_resources=spec.resources or None,
            metadata={"granite_ray_stage": spec.stage, "pipeline_output": self.pipeline.output_uri})
        log(f"{stage.name} ({spec.stage}): job {job_id}: {entrypoint}", TAG)
        self.manifest.update(stage.name, stage=spec.stage, status="running", job_id=job_id, artifact=stage.artifact,
                             config_hash=stage.config_hash, config_uri=config_uri, inputs=stage.inputs,
                             started=_now(), finished=None, seconds=None, metrics={}, error=None)
        logs = JobLogs(stage.name, secrets)
        follower = logs.follow(client, job_id)
        try:
            while (status := str(client.get_job_status(job_id))) not in TERMINAL:
                if spec.stage == "serve" and logs.serving_url and status == "RUNNING":
                    self.manifest.update(stage.name, status="serving", url=logs.serving_url,
                                         seconds=round(time.time() - started, 1))
                    log(f"{stage.name}: serving at {logs.serving_url} (job {job_id} keeps running)", TAG)
                    return logs.serving_url
                if spec.timeout_s and time.time() - started > spec.timeout_s:
                    client.stop_job(job_id)
                    self._fail(stage, started, f"no result after {spec.timeout_s:.0f} s (timeout_s); job stopped")
                time.sleep(self.pipeline.poll_s)
        except KeyboardInterrupt:
            client.stop_job(job_id)
            self.manifest.update(stage.name, status="stopped", finished=_now(), seconds=round(time.time() - started, 1))
            raise
        follower.join(timeout=15)
        if status != "SUCCEEDED":
            message = (client.get_job_info(job_id).message or "").strip().split(", last available logs")[0]
            self._fail(stage, started, f"job {job_id} {status}: {logs.reason()}" + (f" ({message})" if message else ""))
        seconds = round(time.time() - started, 1)
        self.manifest.update(stage.name, status="succeeded", finished=_now(), seconds=seconds,
                             metrics=artifact_metrics(stage.artifact))
        log(f"{stage.name} ({spec.stage}): succeeded in {seconds:.0f} s; artifact {stage.artifact}", TAG)
        return None

    def _fail(self, stage: ResolvedStage, started: float, reason: str) -> None:
        self.manifest.update(stage.name, status="failed", finished=_now(), seconds=round(time.time() - started, 1),
                             error=reason)
        raise PipelineError(f"stage {stage.name!r} ({stage.spec.stage}) failed: {reason}\n"
                            f"  manifest: {self.manifest.uri}; fix it and re-run: completed stages are skipped")


def wait_while_serving(run: PipelineRun) -> None:
    """An embedded head holding Serve stays up until Ctrl-C; otherwise it goes now."""
    if run.head is not None and run.serving:
        log(f"serving at {', '.join(run.serving.values())}; Ctrl-C stops the embedded Ray head", TAG)
        try:
            while run.head.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    run.stop()


def run_pipeline_cli(path: str | None, address: str | None, overrides: list[str]) -> int:
    pipeline = load_config(PipelineConfig, path, overrides)
    run = PipelineRunner(pipeline).run(address)
    log(f"done: {len(run.ran)} ran, {len(run.skipped)} skipped; manifest {storage.join(pipeline.output_uri, 'manifest.json')}", TAG)
    wait_while_serving(run)
    return 0
