"""The package's arrows run one way (entry -> stage -> loop -> objective -> model/loss): read from the
source's imports, top-level and inside functions alike."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "granite_ray"

def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# One module per stage family: what `ray job submit` reaches through the registry's entry strings.
RUNNERS = {*(module_name(p) for p in (PACKAGE / "stages").glob("*.py") if p.stem not in ("__init__", "registry")),
           "granite_ray.evaluate.run", "granite_ray.serve.app"}
# What evaluation, mining and serving run: no training code under it.
INFERENCE = {"granite_ray.stages.mining", "granite_ray.stages.speed",
             *(module_name(p) for folder in ("inference", "evaluate", "serve") for p in (PACKAGE / folder).glob("*.py"))}
TRAINING = ("granite_ray.objectives", "granite_ray.train")


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("granite_ray"):
                for alias in node.names:  # `from granite_ray import storage` names a module
                    targets.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("granite_ray")}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "granite_ray.storage" in graph["granite_ray.models.modernbert"]
    assert "granite_ray.train.loop" in graph["granite_ray.stages.retriever"] and len(RUNNERS) == 10


def test_no_import_cycle():
    graph = import_graph()
    cycles = sorted(name for name in graph if name in reachable(graph, name))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_no_runner_imports_another_runner():
    graph = import_graph()
    crossings = sorted((a, b) for a in RUNNERS for b in graph[a] & RUNNERS)
    assert not crossings


def test_inference_never_reaches_training_code():
    graph = import_graph()
    leaks = {name: sorted(t for t in reachable(graph, name) if t.startswith(TRAINING)) for name in sorted(INFERENCE)}
    assert not {name: found for name, found in leaks.items() if found}


def test_the_training_loop_never_looks_a_stage_up():
    assert not {m for m in reachable(import_graph(), "granite_ray.train.loop") if m.startswith("granite_ray.stages")}


def test_a_package_opens_without_importing_its_rooms():
    """Importing `granite_ray.stages.mining` runs `granite_ray/stages/__init__.py` first: were the registry
    there, every inference runner would import the training objectives. Only config/ gathers its names."""
    graph = import_graph()
    assert {p: graph[module_name(p)] for p in PACKAGE.rglob("__init__.py") if p.parent.name != "config"} == {
        p: set() for p in PACKAGE.rglob("__init__.py") if p.parent.name != "config"}


# The modules whose functions and classes Ray Data runs on raw rows (readers, parsers, tokenizers).
# Each worker process imports the callable's module: with torch and transformers that costs ~12 s
# a worker on 2 cores, paid by every tokenizer actor and by the Train controller that unpickles
# the datasets. Workers that run a model (encoders, teachers, vLLM) need them and are not listed.
DATA_WORKER_MODULES = ["granite_ray.data.rows", "granite_ray.data.corpus", "granite_ray.data.tables", "granite_ray.data.pairs",
                       "granite_ray.data.examples", "granite_ray.data.packing", "granite_ray.data.passages", "granite_ray.evaluate.beir"]


def test_ray_data_workers_import_neither_torch_nor_transformers():
    import json
    import subprocess
    import sys

    probe = ("import importlib, json, sys\nheavy = {'torch', 'transformers', 'sentence_transformers'}\nfound = {}\n"
             f"for name in {DATA_WORKER_MODULES!r}:\n"
             "    importlib.import_module(name)\n    found[name] = sorted(heavy & set(sys.modules))\nprint(json.dumps(found))")
    found = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert found == {name: [] for name in DATA_WORKER_MODULES}
