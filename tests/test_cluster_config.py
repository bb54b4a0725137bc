from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_own_validation():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does: fill defaults, then schema-validate
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}  # trials never run on the head
    assert any("mlflow server" in c for c in config["head_start_ray_commands"])
    assert any("pip install" in c and "sweeper" in c for c in config["setup_commands"])


def test_validation_catches_a_broken_config():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_workers"] = "many"
    with pytest.raises(Exception):  # noqa: B017 - jsonschema.ValidationError, whatever its module
        validate_config(prepare_config(config))
