"""The README's configuration table and Settings.from_env say the same."""

import re
from pathlib import Path

import pytest

from chronoray.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"

# a value for each variable, and where it lands
SAMPLES = {
    "CHRONORAY_DATABASE_URL": ("postgresql://u@h/db", lambda s: s.database_url),
    "CHRONORAY_HTTP_HOST": ("0.0.0.0", lambda s: s.http_host),
    "CHRONORAY_HTTP_PORT": ("9001", lambda s: s.http_port),
    "CHRONORAY_DASHBOARD_PORT": ("0", lambda s: s.dashboard_port),
    "CHRONORAY_NUM_SHARDS": ("4", lambda s: s.num_shards),
    "CHRONORAY_RANGE_S": ("120", lambda s: s.range_s),
    "CHRONORAY_RANGE_SLICES": ("0", lambda s: s.range_slices),
    "CHRONORAY_PREFIRE_MS": ("100", lambda s: s.prefire_ms),
    "CHRONORAY_PRESPAWN": ("off", lambda s: s.prespawn),
    "CHRONORAY_LOOKAHEAD_S": ("30", lambda s: s.lookahead_s),
    "CHRONORAY_SWEEP_INTERVAL_S": ("2", lambda s: s.sweep_interval_s),
    "CHRONORAY_QUEUE_LEASE_S": ("20", lambda s: s.queue_lease_s),
    "CHRONORAY_LEASE_GRACE_S": ("15", lambda s: s.lease_grace_s),
    "CHRONORAY_DISPATCHER_MAX_QUEUED": ("500", lambda s: s.dispatcher_max_queued),
    "CHRONORAY_EXECUTOR_CREDITS": ("3", lambda s: s.executor_credits),
    "CHRONORAY_NAMESPACE": ("other", lambda s: s.namespace),
    "CHRONORAY_MAX_SCRIPT_BYTES": ("1024", lambda s: s.max_script_bytes),
    "CHRONORAY_SERVE_REPLICAS": ("2", lambda s: s.serve_replicas),
    "CHRONORAY_SERVE_INGRESS": ("proxy", lambda s: s.serve_ingress),
    "CHRONORAY_TOKEN_CACHE_S": ("0", lambda s: s.token_cache_s),
    "CHRONORAY_RETRY_BACKOFF_S": ("4", lambda s: s.retry.backoff_base_s),
    "CHRONORAY_MIN_SCHEDULE_INTERVAL_S": ("10", lambda s: s.min_schedule_interval_s),
    "CHRONORAY_MAX_BATCH_TASKS": ("10", lambda s: s.max_batch_tasks),
    "CHRONORAY_AGING_S": ("5", lambda s: s.aging_s),
    "CHRONORAY_RETENTION_DAYS": ("0", lambda s: s.retention_days),
    "CHRONORAY_RETENTION_INTERVAL_S": ("60", lambda s: s.retention_interval_s),
    "CHRONORAY_ZOOKEEPER_HOSTS": ("zk:2181", lambda s: s.zookeeper_hosts),
    "CHRONORAY_ZOOKEEPER_SESSION_TIMEOUT_S": ("3", lambda s: s.zookeeper_session_timeout_s),
    "CHRONORAY_CONTROL_PLANE_RESOURCE": ("head", lambda s: dict(s.control_plane_resources)),
    "CHRONORAY_ADMIN_TOKEN": ("secret", lambda s: s.admin_token),
    "CHRONORAY_DATABASE_REPLICA_URLS": ("postgresql://r1/db", lambda s: s.database_replica_urls),
    "CHRONORAY_RATE_LIMIT_PER_S": ("7", lambda s: s.rate_limit_per_s),
    "CHRONORAY_RATE_LIMIT_BURST": ("9", lambda s: s.rate_limit_burst),
    "CHRONORAY_MAX_ACTIVE_TASKS": ("11", lambda s: s.max_active_tasks),
    "CHRONORAY_MAX_SCHEDULES": ("12", lambda s: s.max_schedules),
    "CHRONORAY_SANDBOX_USER": ("daemon", lambda s: s.sandbox.run_as),
    "CHRONORAY_SCRIPT_NETWORK": ("small=none", lambda s: [t.network for t in s.tiers]),
}
READ_ELSEWHERE = {
    "CHRONORAY_DATA_DIR",  # where the SQLite file goes: the URL shows it
    "CHRONORAY_CONFIG",  # the file (tests/unit/test_config.py)
}


def documented() -> set[str]:
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names = set()
    for row in re.findall(r"^\| `(CHRONORAY_[A-Z_]+)`(?: / `(_[A-Z_]+)`)?", section, re.M):
        first, second = row
        names.add(first)
        if second:
            names.add("CHRONORAY" + second)
    return names


def test_every_documented_variable_is_read_and_every_read_one_documented():
    assert documented() == set(SAMPLES) | READ_ELSEWHERE


def test_each_variable_changes_its_setting(tmp_path):
    default = Settings.from_env({}, data_dir=tmp_path)
    for name, (value, where) in SAMPLES.items():
        changed = Settings.from_env({name: value}, data_dir=tmp_path)
        assert where(changed) != where(default), name


def test_a_switch_takes_words_and_refuses_others(tmp_path):
    for text, wanted in [("false", False), ("0", False), ("On", True), ("yes", True)]:
        assert Settings.from_env({"CHRONORAY_PRESPAWN": text}, data_dir=tmp_path).prespawn is wanted
    with pytest.raises(ValueError, match="CHRONORAY_PRESPAWN: 'maybe' is not true or false"):
        Settings.from_env({"CHRONORAY_PRESPAWN": "maybe"}, data_dir=tmp_path)


def test_an_unknown_ingress_is_refused(tmp_path):
    with pytest.raises(ValueError, match="serve_ingress must be one of"):
        Settings.from_env({"CHRONORAY_SERVE_INGRESS": "nginx"}, data_dir=tmp_path)


def test_data_dir_places_the_embedded_database(tmp_path):
    settings = Settings.from_env({"CHRONORAY_DATA_DIR": str(tmp_path / "d")})
    assert settings.database_url == f"sqlite:///{tmp_path / 'd' / 'chronoray.db'}"


def test_a_credit_window_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="executor_credits"):
        Settings.from_env({"CHRONORAY_EXECUTOR_CREDITS": "0"}, data_dir=tmp_path)


def test_a_retention_shorter_than_the_misfire_catch_up_window_is_refused(tmp_path):
    with pytest.raises(ValueError, match="retention_days"):
        Settings.from_env({"CHRONORAY_RETENTION_DAYS": "0.01"}, data_dir=tmp_path)


def test_the_haproxy_ingress_has_files_of_its_own_and_a_socket_path_haproxy_takes():
    from chronoray.deploy import ingress_environment

    first, second = (
        ingress_environment(Settings(database_url="sqlite://", http_port=port))
        for port in (8000, 8001)
    )
    assert first["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    socket = Path(first["RAY_SERVE_HAPROXY_SOCKET_PATH"])
    # Serve adds a directory of 56 characters; HAProxy refuses paths past 97
    assert len(str(socket.parent / ("x" * 56) / socket.name)) <= 97
    assert socket.parent != Path(second["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
    # HAProxy binds both, metrics on or off: free ports, not its fixed 9101,
    # apart from each other and from the HTTP port (none is bound yet)
    haproxy_ports = {first["RAY_SERVE_HAPROXY_STATS_PORT"], first["RAY_SERVE_HAPROXY_METRICS_PORT"]}
    assert len(haproxy_ports) == 2 and not haproxy_ports & {"8000", "9101"}
    proxy = ingress_environment(Settings(database_url="sqlite://", serve_ingress="proxy"))
    assert proxy == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}


def test_free_ports_are_distinct_and_none_of_those_already_chosen():
    from chronoray.deploy import free_ports

    chosen = free_ports(100)  # released again, so the kernel may offer them anew
    assert len(set(chosen)) == 100
    more = free_ports(200, besides=set(chosen))
    assert len(set(more)) == 200 and not set(more) & set(chosen)
