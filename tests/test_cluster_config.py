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


def _commands(config) -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]]


def test_every_node_starts_with_token_auth_and_the_token_is_shipped():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for cmd in _commands(config):
        if cmd.strip().startswith("ray ") or " ray start" in cmd or cmd.startswith("RAY_AUTH_MODE"):
            assert "RAY_AUTH_MODE=token" in cmd, cmd
    starts = [c for c in _commands(config) if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"


def test_nothing_listens_on_all_interfaces_without_authentication():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for cmd in _commands(config):
        if "ray start --head" in cmd:
            assert "--dashboard-host=127.0.0.1" in cmd and "0.0.0.0" not in cmd  # Jobs API runs arbitrary code
        if "mlflow server" in cmd and "0.0.0.0" in cmd:
            assert "--app-name basic-auth" in cmd and "--allowed-hosts" in cmd, cmd
    assert (ROOT / "experiments" / "mlflow_auth.ini").is_file()
    ini = (ROOT / "experiments" / "mlflow_auth.ini").read_text()
    assert not any(line.strip().startswith("admin_password") for line in ini.splitlines())  # no password in git
