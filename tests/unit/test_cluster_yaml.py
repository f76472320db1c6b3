"""cluster.yaml is a valid launcher config and offers every tier a home."""

from pathlib import Path

import pytest
import yaml

from scheduling.tiers import production_tiers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_validation(config):
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(config))


@pytest.mark.parametrize("tier", list(production_tiers()), ids=lambda t: t.name)
def test_each_tier_has_a_node_type_that_fits_its_executors(config, tier):
    fitting = [
        name
        for name, node in config["available_node_types"].items()
        if node["resources"].get("CPU", 0) >= tier.num_cpus
        and all(node["resources"].get(r, 0) >= amount for r, amount in tier.resources.items())
    ]
    assert fitting == [tier.name]


def test_the_control_plane_resource_is_offered_by_the_head_only(config):
    """Shards, dispatcher and pool ask for it (CHRONORAY_CONTROL_PLANE_RESOURCE):
    on a worker node the autoscaler may remove, they would go with it."""
    offering = [
        name
        for name, node in config["available_node_types"].items()
        if node["resources"].get("chronoray_control", 0) > 0
    ]
    assert offering == [config["head_node_type"]]


def ray_start_variables(config) -> dict[str, dict[str, str]]:
    """The variables each node type's `ray start` line sets before the command."""
    found = {}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        [start] = [c for c in config[key] if "ray start" in c]
        found[key] = dict(word.split("=", 1) for word in start.split("ray start")[0].split())
    return found


def test_every_node_starts_ray_with_the_default_ingress_serve_variables(config):
    """Serve reads them as its processes start: `ray start` must carry them."""
    from chronoray.settings import Settings

    assert Settings(database_url="sqlite://").serve_ingress == "haproxy"
    for key, given in ray_start_variables(config).items():
        assert given.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", key


def test_every_node_starts_ray_with_the_malloc_environment_of_a_local_ray(config):
    """As start_local_ray does: the raylet takes it from `ray start`, and every
    actor from the raylet."""
    from chronoray.deploy import MALLOC_ENVIRONMENT

    for key, given in ray_start_variables(config).items():
        assert given.items() >= MALLOC_ENVIRONMENT.items(), key
