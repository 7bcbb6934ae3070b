"""The Ray cluster-launcher configs (cluster.yaml, deploy/cluster_local.yaml), validated offline.

Ray's own preparation and validation, exactly what ``ray up`` runs before it touches a cloud:
``prepare_config`` (merge with the provider's defaults.yaml; the local provider's node-type rewrite) and
``validate_config`` (ray-schema.json, head node type, worker counts). The provider's ``bootstrap_config``
(IAM roles, key pairs, AMI lookup, instance-type resources) needs the network and is not called; a socket
guard makes any network use fail the test.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
AWS = ROOT / "cluster.yaml"
LOCAL = ROOT / "deploy" / "cluster_local.yaml"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(self, address, *args, **kwargs):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1") and not isinstance(address, (str, bytes)):
            raise AssertionError(f"network access during an offline config check: {address}")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def prepared(config: dict) -> dict:
    out = prepare_config(copy.deepcopy(config))
    validate_config(out)
    return out


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=["aws", "local"])
def test_config_passes_rays_validation(path):
    config = prepared(load(path))
    assert config["head_node_type"] in config["available_node_types"]
    setup = " ".join(config["setup_commands"])
    assert "[vllm]" in setup and "ray[default]==2.60.0" in setup
    assert "~/halffull" in config["file_mounts"]
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_aws_head_is_cpu_only_and_gpu_workers_autoscale():
    config = prepared(load(AWS))
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert len(gpu_types) >= 2
    accelerators = {key for t in gpu_types.values() for key in t["resources"] if key.startswith("accelerator_type:")}
    assert {"accelerator_type:A10G", "accelerator_type:H100"} <= accelerators
    for name, t in workers.items():
        assert t["min_workers"] == 0, f"{name} must scale from zero"
    assert any(t["max_workers"] > 0 for t in gpu_types.values())
    instance_types = {t["node_config"]["InstanceType"] for t in gpu_types.values()}
    assert {"g5.xlarge", "p5.48xlarge"} <= instance_types


def test_aws_comment_block_has_the_commands():
    text = AWS.read_text()
    for command in ("ray up cluster.yaml", "ray attach cluster.yaml", "serve deploy deploy/vllm_gpu.yaml",
                    "ray down cluster.yaml"):
        assert command in text


def test_local_config_lists_hosts():
    raw = load(LOCAL)
    assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    config = prepared(raw)
    (worker_type,) = config["available_node_types"]  # the local provider's single node type
    assert config["available_node_types"][worker_type]["max_workers"] == len(raw["provider"]["worker_ips"])


def _set(config: dict, path: tuple, value) -> dict:
    config = copy.deepcopy(config)
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return config


@pytest.mark.parametrize(
    "path, value, error",
    [
        (("setup_comands",), ["true"], jsonschema.ValidationError),  # misspelled top-level key
        (("available_node_types", "gpu.a10g", "min_worker"), 0, jsonschema.ValidationError),
        (("available_node_types", "gpu.a10g", "max_workers"), "eight", jsonschema.ValidationError),
        (("provider", "type"), "aws_typo", NotImplementedError),
        (("head_node_type",), "head.gpu", ValueError),
        (("max_workers",), -1, jsonschema.ValidationError),
    ],
    ids=["unknown-top-level-key", "unknown-node-type-key", "wrong-type", "unknown-provider", "bad-head-type",
         "negative-max-workers"],
)
def test_broken_aws_config_is_rejected(path, value, error):
    with pytest.raises(error):
        prepared(_set(load(AWS), path, value))


def test_broken_local_config_is_rejected():
    with pytest.raises(jsonschema.ValidationError):
        prepared(_set(load(LOCAL), ("auth", "ssh_usr"), "ubuntu"))
