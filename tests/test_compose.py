"""docker-compose.yml and the process topology (fedpsg.deploy) must use the same flags."""

from pathlib import Path

import pytest
import yaml

from fedpsg.deploy import supernode_command
from fedpsg.runs.superlink import superlink_command

REPO = Path(__file__).resolve().parents[1]
CERTS = Path("/certificates")


def services(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())["services"]


def test_compose_has_a_superlink_five_supernodes_and_a_submitter():
    compose = services("docker-compose.yml")
    assert {"superlink", "submit", *(f"supernode-{k}" for k in range(5))} <= set(compose)
    assert "flwr run /app" in compose["submit"]["command"][-1]
    assert "DONE" in compose["submit"]["command"][-1]  # success is checked, not just the exit code


def test_superlink_flags_match_the_process_topology():
    compose = services("docker-compose.yml")
    assert compose["superlink"]["command"] == superlink_command(9093, "/state/superlink-state.db", host="0.0.0.0")
    tls = services("docker-compose.tls.yml")
    assert tls["superlink"]["command"] == superlink_command(
        9093, "/state/superlink-state.db", tls_dir=CERTS, auth=True, host="0.0.0.0"
    )


@pytest.mark.parametrize("partition", range(5))
def test_supernode_flags_match_the_process_topology(partition):
    expected = supernode_command("superlink:9093", 9100 + partition, partition, 5, "/data")
    assert services("docker-compose.yml")[f"supernode-{partition}"]["command"] == expected
    tls_expected = supernode_command(
        "superlink:9093", 9100 + partition, partition, 5, "/data", CERTS, CERTS / f"node-{partition}"
    )
    assert services("docker-compose.tls.yml")[f"supernode-{partition}"]["command"] == tls_expected


def test_each_party_mounts_only_its_own_data_folder():
    compose = services("docker-compose.yml")
    for k in range(5):
        volumes = compose[f"supernode-{k}"]["volumes"]
        assert volumes == [f"${{PARTY{k}_DATA:-./data}}:/data:ro", f"party{k}-state:/state"]  # + its own ledger


def test_superlink_data_and_results_are_variables_like_the_parties():
    volumes = services("docker-compose.yml")["superlink"]["volumes"]
    assert "${SUPERLINK_DATA:-./data}:/data:ro" in volumes
    assert "${RESULTS_DIR:-./results}:/results" in volumes


def test_flower_version_is_pinned_the_same_in_image_and_pyproject():
    dockerfile = (REPO / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "ARG FLWR_VERSION=1.41.0" in dockerfile and '"flwr[simulation]==1.41.0"' in pyproject
    # torch does not install on Flower's Alpine tags: Ubuntu by default, the base is a build argument
    assert "ARG BASE_IMAGE=ubuntu:" in dockerfile and "FROM ${BASE_IMAGE}" in dockerfile


def test_gpu_variant_reserves_a_gpu_for_every_party():
    gpu = services("docker-compose.gpu.yml")
    for k in range(5):
        devices = gpu[f"supernode-{k}"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
