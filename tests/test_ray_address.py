"""`federation.ray_address` / `fedfer simulate --ray-address` without a cluster: the value is checked in
one line, reaches the simulation as RAY_ADDRESS (and only then), and the ServerApp refuses to run on a
Ray other than the one named. A coordinator bound to one address is dialled there by its own tools.
The two-node cluster itself: tests/test_ray_cluster.py."""

from __future__ import annotations

import types

import pytest

from fedfer import cli
from server import simulation_cluster
from server.deploy.layout import Deployment
from shared_models.config import ConfigError, load_config, ray_address_parts
from simulations.launcher import ray_cluster_env


@pytest.mark.parametrize("value, parts", [("10.0.0.5:6379", ("10.0.0.5", 6379)), ("head.example:1", ("head.example", 1)),
                                          ("[fd00::5]:6379", ("fd00::5", 6379))])
def test_a_head_address_parses(value, parts):
    assert ray_address_parts(value) == parts
    assert load_config(None, [f"federation.ray_address={value}"])["federation.ray_address"] == value


@pytest.mark.parametrize("value", ["6379", "head", "head:", ":6379", "head:0", "head:70000", "ray://head:10001",
                                   "head:63 79", "auto"])
def test_a_malformed_address_is_one_line_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"key 'federation.ray_address' must be HOST:PORT") as info:
        load_config(None, [f"federation.ray_address={value}"])
    assert "\n" not in str(info.value)


def test_cpus_per_school_is_at_least_one():
    with pytest.raises(ConfigError, match="federation.cpus_per_school"):
        load_config(None, ["federation.cpus_per_school=0"])


def test_the_flag_is_checked_before_anything_starts(capsys, tmp_path):
    assert cli.main(["simulate", "--ray-address", "nonsense", f"run.root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fedfer: --ray-address must be HOST:PORT of a Ray cluster's head (e.g. 10.0.0.5:6379); got 'nonsense'"
    assert not any(tmp_path.iterdir()), "a refused run must not create a run directory"


def test_ray_address_reaches_the_simulation_only_when_set():
    assert ray_cluster_env({"federation.ray_address": ""}) == {}
    assert ray_cluster_env({"federation.ray_address": " 10.0.0.5:6379 "}) == {"RAY_ADDRESS": "10.0.0.5:6379"}


class InMemoryGrid:   # the class name Flower's simulation grid has; a deployment's grid is another
    pass


def _fake_ray(monkeypatch, gcs_address: str) -> None:
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(gcs_address=gcs_address))


def test_the_serverapp_refuses_a_simulation_on_another_ray(monkeypatch):
    _fake_ray(monkeypatch, "127.0.0.1:52001")    # a private Ray the simulation started for itself
    with pytest.raises(simulation_cluster.RayClusterError) as info:
        simulation_cluster.check_ray_cluster(InMemoryGrid(), "127.0.0.1:6379")
    message = str(info.value)
    assert "federation.ray_address=127.0.0.1:6379" in message and "127.0.0.1:52001" in message
    assert "RAY_ADDRESS=127.0.0.1:6379" in message and "\n" not in message


def test_the_serverapp_accepts_the_named_cluster_and_ignores_deployments(monkeypatch):
    _fake_ray(monkeypatch, "127.0.0.1:6379")
    assert simulation_cluster.check_ray_cluster(InMemoryGrid(), "127.0.0.1:6379") == "127.0.0.1:6379"
    assert simulation_cluster.check_ray_cluster(InMemoryGrid(), "localhost:6379") == "127.0.0.1:6379"
    assert simulation_cluster.check_ray_cluster(InMemoryGrid(), "") is None
    assert simulation_cluster.check_ray_cluster(object(), "127.0.0.1:6379") is None   # not a simulation


@pytest.mark.parametrize("bind, local", [("0.0.0.0", "127.0.0.1:9093"), ("127.0.0.1", "127.0.0.1:9093"),
                                         ("10.231.0.1", "10.231.0.1:9093"), ("::1", "[::1]:9093")])
def test_the_coordinators_own_tools_dial_the_address_the_superlink_is_bound_to(tmp_path, bind, local):
    assert Deployment(root=tmp_path, coordinator="fl.example", bind=bind).local_address == local
