"""KubeRay manifests (cluster/kuberay/*.yaml), checked without a cluster: the fields KubeRay requires,
worker group bounds and GPU limits, that each RayJob's entrypoint names a real job whose config and
overrides load, that the cluster has the GPUs the job asks for, and that the RayService's Serve
config validates, builds, and keeps cluster/serve.yaml's applications. Broken copies are refused.

Required fields follow ray-project/kuberay ray-operator/config/crd/bases/ray.io_rayclusters.yaml
(spec.headGroupSpec; worker groups: groupName, minReplicas, maxReplicas, rayStartParams, template;
pod spec: containers; container: name) and the operator's validation
(ray-operator/controllers/ray/utils/validation.go: names are DNS-1035 labels of at most 47
characters for RayJob and RayService, at least one container per group, a RayJob needs
rayClusterSpec or clusterSelector, ttlSecondsAfterFinished only with shutdownAfterJobFinishes).
rayStartParams is optional from KubeRay 1.4; it is required here so that older operators accept
the manifests too."""

from __future__ import annotations

import ast
import copy
import math
import re
import shlex

import pytest
import ray
import yaml
from conftest import REPO
from ray.runtime_env import RuntimeEnv

from granite_ray.cli import build_parser
from granite_ray.config import ConfigError, EncoderPoolFields, StageConfig, load_config
from granite_ray.stages.registry import STAGES

KUBERAY = REPO / "cluster" / "kuberay"
MAX_NAME_LENGTH = 47  # KubeRay appends 6 characters for the RayCluster, whose names stop at 53
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
SHELL_OPERATOR = re.compile(r"[();<>|&]+")  # shlex's punctuation_chars
GPU = "nvidia.com/gpu"
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.I)


class ManifestError(Exception):
    pass


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ManifestError(message)


def documents() -> list[tuple[str, dict]]:
    """Each manifest document, named file[index] (a file may hold several)."""
    return [(f"{path.name}[{i}]", doc) for path in sorted(KUBERAY.glob("*.yaml"))
            for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]


# --- the cluster -----------------------------------------------------------------------------------

def check_name(where: str, doc: dict) -> None:
    name = doc.get("metadata", {}).get("name", "")
    require(DNS1035_LABEL.fullmatch(name) is not None and len(name) <= MAX_NAME_LENGTH,
            f"{where}: metadata.name {name!r} must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters")


def gpu_limit(container: dict) -> int:
    resources = container.get("resources", {})
    limit = int(resources.get("limits", {}).get(GPU, 0))
    requested = resources.get("requests", {}).get(GPU)
    require(requested is None or int(requested) == limit, f"container {container.get('name')}: {GPU} request != limit")
    return limit


def check_group(where: str, group: dict) -> int:
    """A head or worker group's pod; returns the GPUs of one pod."""
    require(isinstance(group.get("rayStartParams"), dict), f"{where}: rayStartParams must be a mapping")
    require("template" in group, f"{where}: template is required")
    containers = group["template"].get("spec", {}).get("containers") or []
    require(len(containers) > 0, f"{where}: template.spec.containers needs at least one container")
    for container in containers:
        name = container.get("name", "")
        require(DNS1123_LABEL.fullmatch(name) is not None, f"{where}: container name {name!r} is not a DNS-1123 label")
        require(bool(container.get("image")), f"{where}: container {name} has no image")
        for env in container.get("env", []):
            require(not (SECRET_NAME.search(env["name"]) and "value" in env),
                    f"{where}: {env['name']} is a literal; take it from a Secret (valueFrom)")
    gpus = gpu_limit(containers[0])  # KubeRay reads the Ray container, the first
    num_gpus = group["rayStartParams"].get("num-gpus")
    require(num_gpus is None or int(num_gpus) == gpus,
            f"{where}: rayStartParams num-gpus {num_gpus} != the container's {GPU} limit {gpus}")
    return gpus


def check_cluster_spec(where: str, spec: dict) -> tuple[int, int]:
    """Returns the cluster's GPUs at full scale and the most GPUs of one pod."""
    require(str(spec.get("rayVersion")) == ray.__version__,
            f"{where}: rayVersion {spec.get('rayVersion')} is not the project's Ray {ray.__version__}")
    require("headGroupSpec" in spec, f"{where}: headGroupSpec is required")
    head_gpus = check_group(f"{where}.headGroupSpec", spec["headGroupSpec"])
    total, largest = head_gpus, head_gpus
    names = [group.get("groupName") for group in spec.get("workerGroupSpecs", [])]
    require(len(names) == len(set(names)), f"{where}: worker group names repeat: {names}")
    for group in spec.get("workerGroupSpecs", []):
        name = group.get("groupName")
        require(bool(name), f"{where}: a worker group has no groupName")
        for key in ("replicas", "minReplicas", "maxReplicas"):
            require(isinstance(group.get(key), int), f"{where}.{name}: {key} must be an integer")
        require(0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"],
                f"{where}.{name}: needs minReplicas <= replicas <= maxReplicas")
        gpus = check_group(f"{where}.{name}", group)
        total += gpus * group["maxReplicas"]
        largest = max(largest, gpus)
    return total, largest


def check_fits(where: str, demand: tuple[int, int], capacity: tuple[int, int]) -> None:
    (total, per_bundle), (cluster_total, largest_pod) = demand, capacity
    require(total <= cluster_total, f"{where}: needs {total} GPUs, the cluster has at most {cluster_total}")
    require(per_bundle <= largest_pod, f"{where}: needs {per_bundle} GPUs on one node, the largest pod has {largest_pod}")


# --- RayJob entrypoints ----------------------------------------------------------------------------

def shell_words(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """The commands the job runs on the Ray cluster. KubeRay's submitter pod runs
    `bash -c "ray job submit ... -- <entrypoint>"`, so a bare `&&` or `;` would end the submit
    command and run the rest in the submitter pod: steps are chained inside `bash -c '...'`."""
    words = shell_words(entrypoint)
    operators = [w for w in words if SHELL_OPERATOR.fullmatch(w)]
    require(not operators, f"entrypoint: {operators} would run in the submitter pod; chain steps in bash -c '...'")
    if len(words) == 3 and words[0] in ("bash", "sh") and words[1] == "-c":
        script = shell_words(words[2])
        require(all(w == "&&" for w in script if SHELL_OPERATOR.fullmatch(w)), f"entrypoint: only && chains steps: {words[2]!r}")
        steps, step = [], []
        for word in [*script, "&&"]:
            if word == "&&":
                steps.append(step)
                step = []
            else:
                step.append(word)
        return steps
    return [words]


def stage_of(job_file) -> str:
    """The stage a jobs/*.py script runs: the first item of its `main([stage, *sys.argv[1:]])`."""
    for node in ast.walk(ast.parse(job_file.read_text())):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "main" and node.args
                and isinstance(node.args[0], ast.List) and isinstance(node.args[0].elts[0], ast.Constant)):
            return node.args[0].elts[0].value
    raise ManifestError(f"{job_file.name}: no main([stage, ...]) call")


def load_command(command: list[str]) -> StageConfig:
    """The config a `python jobs/<x>.py [--config FILE] [key=value ...]` command would run with, loaded
    as granite_ray.cli does; the image holds the repository at /app, its working directory."""
    require(len(command) >= 2 and command[0] in ("python", "python3") and command[1].startswith("jobs/"),
            f"{shlex.join(command)}: expected python jobs/<stage>.py ...")
    job_file = REPO / command[1]
    require(job_file.is_file(), f"{command[1]} is not in the repository")
    stage = stage_of(job_file)
    require(stage in STAGES, f"{command[1]} runs {stage!r}, not a stage")
    try:
        args = build_parser().parse_args([stage, *command[2:]])
    except SystemExit:
        raise ManifestError(f"{shlex.join(command)}: granite-ray {stage} refuses these arguments") from None
    if args.config:
        require((REPO / args.config).is_file(), f"{args.config} is not in the repository")
    try:
        return load_config(STAGES[stage].config_cls, REPO / args.config if args.config else None,
                           [f"stage={stage}", *args.overrides])
    except ConfigError as err:
        raise ManifestError(f"{shlex.join(command)}: {err}") from None


def gpu_demand(config: StageConfig) -> tuple[int, int]:
    """GPUs the stage asks Ray for (all of them, and the most on one node): Ray Train workers,
    vLLM engines (tensor parallel on one node) or Ray Data encoder actors."""
    train, llm = getattr(config, "train", None), getattr(config, "llm", None)
    if train is not None and train.use_gpu is not False:
        return train.num_workers, 1
    if llm is not None:
        return llm.replicas * llm.tensor_parallel_size, llm.tensor_parallel_size
    if isinstance(config, EncoderPoolFields):
        per_actor = 1 if config.gpus_per_actor is None else config.gpus_per_actor
        return math.ceil(config.encode_actors * per_actor), math.ceil(per_actor)
    return 0, 0


def check_rayjob(where: str, doc: dict) -> list[StageConfig]:
    check_name(where, doc)
    spec = doc.get("spec", {})
    require(spec.get("submissionMode") == "K8sJobMode",
            f"{where}: submissionMode must be K8sJobMode, whose submitter shell the entrypoints are written for")
    require(spec.get("shutdownAfterJobFinishes") is True, f"{where}: shutdownAfterJobFinishes: true frees the GPUs")
    require(isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0,
            f"{where}: ttlSecondsAfterFinished must be a non-negative integer")
    require("rayClusterSpec" in spec, f"{where}: rayClusterSpec is required (no clusterSelector here)")
    if "runtimeEnvYAML" in spec:
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        require(isinstance(runtime_env, dict), f"{where}: runtimeEnvYAML must be a YAML mapping")
        env_vars = runtime_env.get("env_vars", {})
        RuntimeEnv(env_vars=env_vars)  # str -> str, as Ray requires
        require(not [k for k in env_vars if SECRET_NAME.search(k)], f"{where}: no credentials in runtimeEnvYAML")
    capacity = check_cluster_spec(f"{where}.rayClusterSpec", spec["rayClusterSpec"])
    require(bool(spec.get("entrypoint")), f"{where}: entrypoint is required")
    configs = [load_command(command) for command in entrypoint_commands(spec["entrypoint"])]
    for config in configs:
        check_fits(f"{where} ({config.stage})", gpu_demand(config), capacity)
    return configs


# --- RayService ------------------------------------------------------------------------------------

def check_rayservice(where: str, doc: dict) -> None:
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    check_name(where, doc)
    spec = doc.get("spec", {})
    require("rayClusterConfig" in spec, f"{where}: rayClusterConfig is required")
    capacity = check_cluster_spec(f"{where}.rayClusterConfig", spec["rayClusterConfig"])
    config = yaml.safe_load(spec.get("serveConfigV2", ""))
    require(isinstance(config, dict), f"{where}: serveConfigV2 must be a YAML mapping")
    try:
        schema = ServeDeploySchema.model_validate(config)
    except ValueError as err:
        raise ManifestError(f"{where}: serveConfigV2: {err}") from None
    require(schema.http_options.host == "0.0.0.0", f"{where}: Serve must bind 0.0.0.0 for KubeRay's serve Service")
    demand, per_replica = 0, 0
    for app in schema.applications:
        try:
            builder = import_attr(app.import_path)
        except (ImportError, AttributeError) as err:
            raise ManifestError(f"{where}: {app.name}: import_path {app.import_path}: {err}") from None
        built = build_app(call_user_app_builder_with_args_if_necessary(builder, app.args), name=app.name)
        built_names = {d.name for d in built.deployments}
        require({d.name for d in app.deployments} <= built_names,
                f"{where}: {app.name} configures deployments it does not build (it builds {sorted(built_names)})")
        for deployment in app.deployments:
            gpus = deployment.ray_actor_options.num_gpus or 0
            autoscaling = deployment.autoscaling_config
            replicas = autoscaling["max_replicas"] if autoscaling else deployment.num_replicas
            require(isinstance(replicas, int), f"{where}: {deployment.name}: give num_replicas or autoscaling max_replicas")
            demand += math.ceil(gpus * replicas)
            per_replica = max(per_replica, math.ceil(gpus))
    check_fits(where, (demand, per_replica), capacity)
    serve_yaml = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    require(config["applications"] == serve_yaml["applications"],
            f"{where}: serveConfigV2 applications differ from cluster/serve.yaml's")


def check_manifest(where: str, doc: dict) -> None:
    require(doc.get("apiVersion") == "ray.io/v1", f"{where}: apiVersion must be ray.io/v1")
    checks = {"RayJob": check_rayjob, "RayService": check_rayservice}
    require(doc.get("kind") in checks, f"{where}: kind {doc.get('kind')!r} is not a RayJob or RayService")
    checks[doc["kind"]](where, doc)


# --- tests -----------------------------------------------------------------------------------------

DOCUMENTS = documents()


@pytest.mark.parametrize("where,doc", DOCUMENTS, ids=[where for where, _ in DOCUMENTS])
def test_manifest_is_valid(where, doc):
    check_manifest(where, doc)


def test_there_is_a_job_for_each_stage_family_and_a_service():
    stages = {config.stage for where, doc in DOCUMENTS if doc["kind"] == "RayJob" for config in check_rayjob(where, doc)}
    assert stages == {"pretrain-mlm", "retromae", "contrastive", "summarize-tables", "mine-negatives",
                      "teacher-scores", "eval"}
    assert [doc["kind"] for _, doc in DOCUMENTS].count("RayService") == 1


def test_entrypoints_split_where_the_cluster_runs_them():
    assert entrypoint_commands("python jobs/eval.py 'models=[a, b]'") == [["python", "jobs/eval.py", "models=[a, b]"]]
    assert entrypoint_commands("bash -c 'python jobs/a.py x=1 && python jobs/b.py'") == [
        ["python", "jobs/a.py", "x=1"], ["python", "jobs/b.py"]]
    assert stage_of(REPO / "jobs" / "evaluate.py") == "eval"


def mutated(name: str, change) -> tuple[str, dict]:
    """A copy of the named manifest with one mistake in it, for the checks to refuse."""
    where, doc = next((w, d) for w, d in DOCUMENTS if d["metadata"]["name"] == name)
    doc = copy.deepcopy(doc)
    change(doc)
    return where, doc


def set_entrypoint(text: str):
    return lambda doc: doc["spec"].__setitem__("entrypoint", text)


def first_worker(doc: dict) -> dict:
    return (doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"])["workerGroupSpecs"][0]


PRETRAIN = "python jobs/pretrain_mlm.py --config configs/pretrain_mlm_base.yaml"
BROKEN = {
    "no head group": ("granite-ray-pretrain-mlm", lambda d: d["spec"]["rayClusterSpec"].pop("headGroupSpec"),
                      "headGroupSpec is required"),
    "no rayStartParams": ("granite-ray-pretrain-mlm",
                          lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].pop("rayStartParams"), "rayStartParams"),
    "no containers": ("granite-ray-eval", lambda d: first_worker(d)["template"]["spec"].__setitem__("containers", []),
                      "at least one container"),
    "no image": ("granite-ray-eval", lambda d: first_worker(d)["template"]["spec"]["containers"][0].pop("image"), "no image"),
    "replicas above max": ("granite-ray-eval", lambda d: first_worker(d).__setitem__("replicas", 9), "minReplicas <= replicas"),
    "num-gpus != limit": ("granite-ray-pretrain-mlm", lambda d: first_worker(d)["rayStartParams"].__setitem__("num-gpus", "4"),
                          "num-gpus 4"),
    "too few GPUs": ("granite-ray-pretrain-mlm",
                     lambda d: first_worker(d)["template"]["spec"]["containers"][0]["resources"]["limits"].__setitem__(GPU, 4),
                     "needs 8 GPUs"),
    "wrong Ray": ("granite-ray-eval", lambda d: d["spec"]["rayClusterSpec"].__setitem__("rayVersion", "2.9.0"), "rayVersion"),
    "bad name": ("granite-ray-eval", lambda d: d["metadata"].__setitem__("name", "Granite_Eval"), "DNS-1035"),
    "no shutdown": ("granite-ray-eval", lambda d: d["spec"].__setitem__("shutdownAfterJobFinishes", False),
                    "shutdownAfterJobFinishes"),
    "missing job": ("granite-ray-pretrain-mlm", set_entrypoint("python jobs/nope.py"), "jobs/nope.py is not in the repository"),
    "missing config": ("granite-ray-pretrain-mlm", set_entrypoint("python jobs/pretrain_mlm.py --config configs/nope.yaml"),
                       "configs/nope.yaml is not in the repository"),
    "bad override key": ("granite-ray-pretrain-mlm", set_entrypoint(f"{PRETRAIN} train.lrr=1e-4"), "lrr"),
    "bad override value": ("granite-ray-pretrain-mlm", set_entrypoint(f"{PRETRAIN} train.num_workers=0"), "num_workers"),
    "unknown flag": ("granite-ray-pretrain-mlm", set_entrypoint(f"{PRETRAIN} --confg x.yaml"), "refuses"),
    "bare &&": ("granite-ray-mine-and-score", set_entrypoint(f"{PRETRAIN} && python jobs/evaluate.py"), "submitter pod"),
    "literal secret": ("granite-ray-serve", lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
                       ["containers"][0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}), "literal"),
    "bad import path": ("granite-ray-serve", lambda d: d["spec"].__setitem__(
        "serveConfigV2", d["spec"]["serveConfigV2"].replace("granite_ray.serve.app:build_app", "granite_ray.serve.app:nope")),
                        "import_path granite_ray.serve.app:nope"),
    "drifted from serve.yaml": ("granite-ray-serve", lambda d: d["spec"].__setitem__(
        "serveConfigV2", d["spec"]["serveConfigV2"].replace("max_batch_tokens: 32768", "max_batch_tokens: 16384")),
                                "differ from cluster/serve.yaml"),
    "loopback Serve": ("granite-ray-serve", lambda d: d["spec"].__setitem__(
        "serveConfigV2", d["spec"]["serveConfigV2"].replace("host: 0.0.0.0", "host: 127.0.0.1")), "0.0.0.0"),
    "invalid Serve config": ("granite-ray-serve", lambda d: d["spec"].__setitem__(
        "serveConfigV2", d["spec"]["serveConfigV2"].replace("route_prefix: /", "route_prefix: nope")), "serveConfigV2"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_copy_is_refused(case):
    name, change, message = BROKEN[case]
    where, doc = mutated(name, change)
    with pytest.raises(ManifestError, match=re.escape(message)):
        check_manifest(where, doc)

