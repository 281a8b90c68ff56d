"""ray_cluster.yaml passes Ray's own cluster-config validation; a broken copy does not."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.study.conftest import REPO


@pytest.fixture()
def config():
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def _validate(config):
    """What `ray up` does: fill in the provider's defaults, then check against Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_cluster_yaml_validates(config):
    _validate(config)
    assert config["head_node_type"] in config["available_node_types"]
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0
    assert config["available_node_types"]["head"]["resources"]["CPU"] == 0  # no trials on the head
    assert config["idle_timeout_minutes"] > 0 and config["max_workers"] >= gpu["max_workers"]


@pytest.mark.parametrize(
    "break_it, match",
    [
        (lambda c: c.pop("head_node_type"), "`head_node_type` must be one of `available_node_types`"),
        (lambda c: c.__setitem__("head_node_type", "gpu_head"), "`head_node_type` must be one of"),
        (lambda c: c.__setitem__("max_workers", "many"), "'many' is not of type 'integer'"),
    ],
)
def test_a_broken_copy_fails_with_rays_message(config, break_it, match):
    broken = copy.deepcopy(config)
    break_it(broken)
    with pytest.raises(Exception, match=match):
        _validate(broken)
