"""cluster/aws.yaml passes Ray's own cluster-config schema and has the node types the stages need."""

from __future__ import annotations

import copy
import sys

import pytest
import yaml
from conftest import REPO


def _prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_aws_cluster_yaml_is_valid_for_ray():
    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    prepared = _prepared(config)
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu_train_8xh100"]["resources"]["GPU"] == 8 and types["cpu_data"]["max_workers"] > 0
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())  # S3 by instance profile
    broken = copy.deepcopy(config)
    broken["available_node_types"]["cpu_data"]["min_workers"] = "many"
    with pytest.raises(Exception, match="many|not of type|is not valid"):
        _prepared(broken)


def test_local_autoscaling_cluster_brings_up_a_fake_gpu_node_for_a_stage_and_removes_it(tmp_path):
    """cluster/local-autoscaling.yaml on the fake multinode provider: a stage whose driver needs
    {"GPU": 1} makes the autoscaler start a gpu node, runs there, and the idle node goes away."""
    import time

    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_nodes

    from granite_ray.config import PipelineConfig
    from granite_ray.localray import LocalRayHead
    from granite_ray.pipeline import PipelineRunner

    config = yaml.safe_load((REPO / "cluster" / "local-autoscaling.yaml").read_text())
    assert set(config["available_node_types"]) == {"ray.head.default", "cpu_data", "gpu_train", "gpu_infer_1x"}  # aws.yaml's shape
    assert {t for t, spec in config["available_node_types"].items() if spec["resources"].get("GPU")} == {"gpu_train", "gpu_infer_1x"}
    with LocalRayHead(num_cpus=2, autoscaling_config=REPO / "cluster" / "local-autoscaling.yaml") as head:
        deadline = time.time() + 30
        while not (alive := [n for n in list_nodes(address=head.address, detail=True) if n.state == "ALIVE"]):
            assert time.time() < deadline, "the head node never registered"
            time.sleep(1)
        assert [n.resources_total.get("GPU") for n in alive] == [None]  # the head alone, no GPU
        pipeline = PipelineConfig.model_validate({
            "output_uri": str(tmp_path / "out"), "python": sys.executable, "working_dir": str(REPO),
            "stages": [{"name": "tokenizer", "stage": "train-tokenizer", "num_gpus": 1,
                        "overrides": [f"data.paths=[{REPO / 'data' / 'sample' / 'adi.jsonl'}]", "tokenizer.vocab_size=512"]}]})
        run = PipelineRunner(pipeline).run(head.address)
        job = JobSubmissionClient(head.address).get_job_info(run.manifest["stages"]["tokenizer"]["job_id"])
        nodes = {n.node_id: n for n in list_nodes(address=head.address, detail=True)}
        gpu_node = nodes[job.driver_node_id]
        advertised = {k: v for k, v in gpu_node.resources_total.items() if k not in ("memory", "object_store_memory")
                      and not k.startswith("node:")}
        assert advertised in [spec["resources"] for t, spec in config["available_node_types"].items() if t.startswith("gpu")]
        assert not gpu_node.is_head_node
        assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").exists()
        deadline = time.time() + 90
        while time.time() < deadline:
            if {n.node_id: n.state for n in list_nodes(address=head.address)}.get(job.driver_node_id) == "DEAD":
                break
            time.sleep(2)
        else:
            raise AssertionError("the idle GPU node was not removed within 90 s")
