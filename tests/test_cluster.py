"""cluster/aws.yaml passes Ray's own cluster-config schema and has the node types the stages need."""

from __future__ import annotations

import copy

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
