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


def test_every_node_sees_the_storage_of_the_recipe():
    """The head exports the sweeps folder over NFS and every worker mounts it at the same path: the path
    the header and the README pass as --storage is shared, not a folder only the head has."""
    text = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    assert (
        "--storage /home/ubuntu/sweeps" in text and "--storage /home/ubuntu/sweeps" in (ROOT / "README.md").read_text()
    )
    head, worker = " ".join(config["head_setup_commands"]), " ".join(config["worker_setup_commands"])
    assert "nfs-kernel-server" in head and "'/home/ubuntu/sweeps *(rw," in head and "exportfs -ra" in head
    assert "mount -t nfs4" in worker and "$RAY_HEAD_IP:/home/ubuntu/sweeps /home/ubuntu/sweeps" in worker
    filled = prepare_config(config)  # what `ray up` runs on a worker: common setup, then the worker's
    assert filled["worker_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]


def test_the_admin_password_stays_on_the_head_and_the_header_points_to_the_readme():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert config["file_mounts"]["/home/ubuntu/.sweeper/sweeps.env"] == "~/.sweeper/sweeps.env"  # trials log with it
    assert "rm -f /home/ubuntu/.sweeper/mlflow.env" in config["worker_setup_commands"]  # file_mounts copy it everywhere
    header = (ROOT / "cluster.yaml").read_text().split("cluster_name:")[0]
    assert 'README, "On a cluster"' in header and "ray job submit --" not in header  # one recipe, the README's
    assert "copy to every node" in header and "shipped to the head" not in header  # what file_mounts really do
