"""The config file: every setting and the tier table, overridden by the
environment, refused with its line when it cannot be used."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chronoray.config import SCALARS, ConfigError, load
from scheduling.tiers import NetworkPolicy, NodeOffer, homeless_tiers, production_tiers
from tests.unit.test_settings import SAMPLES

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "chronoray.example.yaml"
CHRONORAY = Path(sys.executable).parent / "chronoray"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "chronoray.yaml"
    path.write_text(text)
    return path


def refusal(tmp_path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as refused:
        load({}, data_dir=tmp_path, config=write(tmp_path, text))
    return refused.value


def test_every_variable_is_a_key_of_the_file():
    assert {f"CHRONORAY_{name.upper()}" for name in SCALARS} == set(SAMPLES)


def test_the_example_config_is_cluster_yamls_tier_table(tmp_path):
    loaded = load({}, data_dir=tmp_path, config=EXAMPLE)
    assert loaded.settings.tiers.tiers == production_tiers().tiers
    assert loaded.cluster_config == ROOT / "cluster.yaml"
    assert dict(loaded.settings.control_plane_resources) == {"chronoray_control": 0.01}
    lines = EXAMPLE.read_text().splitlines()
    for name, where in loaded.tier_lines.items():
        assert lines[int(where.rsplit(":", 1)[1]) - 1].strip() == f"- name: {name}"
    assert lines[int(loaded.sources["num_shards"].rsplit(":", 1)[1]) - 1] == "num_shards: 4"


def test_example_tiers_each_have_a_node_type_in_cluster_yaml():
    launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    nodes = [
        NodeOffer(name, spec.get("resources", {}), spec.get("labels", {}))
        for name, spec in launcher["available_node_types"].items()
    ]
    tiers = load({}, config=EXAMPLE).settings.tiers
    assert homeless_tiers(tiers, nodes) == {}


def test_variables_override_the_file_and_say_so(tmp_path):
    path = write(tmp_path, "num_shards: 3\nhttp_port: 9000\n")
    loaded = load({"CHRONORAY_NUM_SHARDS": "5"}, data_dir=tmp_path, config=path)
    assert (loaded.settings.num_shards, loaded.settings.http_port) == (5, 9000)
    assert loaded.sources["num_shards"] == "CHRONORAY_NUM_SHARDS"
    assert loaded.sources["http_port"] == f"{path}:2"
    assert "range_s" not in loaded.sources  # a default


def test_chronoray_config_names_the_file(tmp_path):
    path = write(tmp_path, "namespace: from-file\n")
    settings = load({"CHRONORAY_CONFIG": str(path)}, data_dir=tmp_path).settings
    assert settings.namespace == "from-file"


def test_every_key_set_in_the_file_lands_where_its_variable_does(tmp_path):
    default = load({}, data_dir=tmp_path).settings
    for variable, (text, where) in SAMPLES.items():
        key = variable.removeprefix("CHRONORAY_").lower()
        value = yaml.safe_load(text) if SCALARS[key] is not str else text
        if SCALARS[key] is list:
            value = [text]
        from_file = load({}, data_dir=tmp_path, config=write(tmp_path, yaml.dump({key: value})))
        from_env = load({variable: text}, data_dir=tmp_path)
        assert where(from_file.settings) == where(from_env.settings) != where(default), key


def test_a_tier_table_with_labels_resources_and_pool_timing(tmp_path):
    settings = load(
        {},
        data_dir=tmp_path,
        config=write(
            tmp_path,
            """
tiers:
  - {name: cheap, min_priority: 0, node_labels: {pool: spot}, slots: 8, network: none}
  - {name: big, min_priority: 5, resources: {gpu_box: 1}, min_executors: 0, max_executors: 3}
pool: {heartbeat_s: 0.5, misses: 5}
""",
        ),
    ).settings
    cheap, big = settings.tiers
    assert cheap.actor_options()["label_selector"] == {"pool": "spot"}
    assert (cheap.slots, cheap.network) == (8, NetworkPolicy.NONE)
    assert big.actor_options()["resources"] == {"gpu_box": 1}
    assert (big.executors, big.most_executors) == (0, 3)
    assert settings.tiers.tier_for(4).name == "cheap"
    assert (settings.pool_timing.heartbeat_s, settings.pool_timing.misses) == (0.5, 5)
    assert isinstance(settings.pool_timing.misses, int)


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ("num_shards: 2\nnum_shard: 3\n", 2, "unknown key 'num_shard'"),
        (
            "tiers:\n  - name: a\n    min_priority: 0\n    slotz: 3\n",
            4,
            "unknown key 'slotz' (a tier takes:",
        ),
        ("num_shards: many\n", 1, "valid integer"),
        ("tiers:\n  - name: a\n", 2, "'min_priority' is required"),
        (
            "tiers:\n  - {name: a, min_priority: 0, max_priority: 4}\n"
            "  - {name: b, min_priority: 3}\n",
            3,
            "tier 'b' (from priority 3) overlaps tier 'a' (priorities 0-4)",
        ),
        (
            "tiers:\n  - {name: a, min_priority: 0}\n  - {name: b, min_priority: 0}\n",
            3,
            "overlaps tier 'a'",
        ),
        (
            "tiers:\n  - {name: a, min_priority: 0, max_priority: 2}\n"
            "  - {name: b, min_priority: 5}\n",
            2,
            "priorities 3-4 have no tier",
        ),
        ("tiers:\n  - {name: a, min_priority: 1}\n", 2, "must start at priority 0"),
        (
            "tiers:\n  - {name: a, min_priority: 0}\n  - {name: a, min_priority: 3}\n",
            3,
            "tier name 'a' is used twice",
        ),
        ("num_shards: [1\n", 2, "not valid YAML"),
        ("- 1\n- 2\n", 1, "must be a mapping"),
        ("executor_credits: 0\n", 1, "executor_credits must be at least 1"),
        ("ray_cluster_config: nowhere.yaml\n", 1, "no such file"),
    ],
)
def test_an_unusable_file_is_refused_with_its_line(tmp_path, text, line, reason):
    refused = refusal(tmp_path, text)
    assert refused.where == f"{tmp_path / 'chronoray.yaml'}:{line}"
    assert reason in refused.reason


def test_a_bad_variable_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError) as refused:
        load({"CHRONORAY_HTTP_PORT": "eighty"}, data_dir=tmp_path)
    assert refused.value.where == "CHRONORAY_HTTP_PORT"


def test_tiers_no_node_can_host_are_named_with_the_reason():
    tiers = load({}, config=EXAMPLE).settings.tiers
    nodes = [
        NodeOffer("head", {"CPU": 2, "chronoray_control": 100}),
        NodeOffer("w1", {"CPU": 4, "chronoray_small": 8, "chronoray_medium": 1}),
    ]
    problems = homeless_tiers(tiers, nodes)
    assert list(problems) == ["large"]
    assert "chronoray_large=1, CPU=2" in problems["large"] and "head, w1" in problems["large"]
    labelled = load(
        {},
        config=Path(__file__).parent / "data" / "labelled-tiers.yaml",
    ).settings.tiers
    assert list(homeless_tiers(labelled, [NodeOffer("n", {"CPU": 2}, {"zone": "a"})])) == ["b"]


def test_config_show_prints_sources_and_refuses_a_bad_file(tmp_path):
    path = write(tmp_path, "num_shards: 3\n")
    shown = subprocess.run(
        [str(CHRONORAY), "config", "show", "--config", str(path), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"CHRONORAY_HTTP_PORT": "9001", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line.split()[1:] for line in shown.stdout.splitlines() if line.strip()}
    assert rows["num_shards"] == ["3", f"{path}:1"]
    assert rows["http_port"] == ["9001", "CHRONORAY_HTTP_PORT"]
    assert rows["range_s"] == ["60", "default"]
    assert rows["small"][-1] == "default"

    path.write_text("num_shards: 3\ntiers:\n  - {name: a, min_priority: 2}\n")
    refused = subprocess.run(
        [str(CHRONORAY), "config", "show", "--config", str(path), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert f"{path}:3: the weakest tier must start at priority 0" in " ".join(
        refused.stderr.split()
    )
