"""Fixtures shared by every layer: real PostgreSQL from `make test`."""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.shared_dirs import shared_directory

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
SCREENSHOTS: list[Path] = []  # written by the browser tests; named in the run's summary


def pytest_terminal_summary(terminalreporter) -> None:
    if SCREENSHOTS:
        folders = sorted({str(shot.parent) for shot in SCREENSHOTS})
        terminalreporter.write_line(
            f"console screenshots: {len(SCREENSHOTS)} PNGs in {', '.join(folders)}"
        )


@pytest.fixture
def tmp_path():
    """Scripts run as an unprivileged user (when the suite runs as root), so
    they must be able to read and write here: ledgers, markers. pytest's own
    tmp_path is private to root, and scripts do not see the host's /tmp."""
    directory = shared_directory("chronoray-test-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def shared_file(directory: Path, name: str) -> Path:
    """An empty file every script may append to: each running script has a
    uid of its own, so a file one run creates is not another run's."""
    path = directory / name
    path.touch()
    path.chmod(0o666)
    return path


def postgres_admin_url() -> str:
    url = os.environ.get("CHRONORAY_TEST_POSTGRES_URL")
    if not url:
        pytest.fail("CHRONORAY_TEST_POSTGRES_URL is not set: run the suite with `make test`")
    return url


def create_postgres_database(prefix: str = "t") -> str:
    """A new, empty database on the throwaway server; returns its URL."""
    admin = postgres_admin_url()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin.rsplit("/", 1)[0] + f"/{name}"


# -- the session deployment on real Ray and PostgreSQL (integration, faults) --


@pytest.fixture(scope="session")
def deployment():
    import ray

    from chronoray.deploy import teardown
    from tests.ray_cluster import deploy_for_tests

    deployed = deploy_for_tests(create_postgres_database("integration"))
    try:
        yield deployed
    finally:
        try:
            teardown(deployed.settings)
        finally:
            ray.shutdown()
            deployed.head.stop()


@pytest.fixture(scope="session")
def client(deployment):
    from chronoray import Client

    return Client(namespace=deployment.settings.namespace)


@pytest.fixture(scope="session")
def http(deployment):
    import httpx

    with httpx.Client(
        base_url=deployment.url,
        timeout=30,
        headers={"Authorization": f"Bearer {deployment.token}"},
    ) as session:
        yield session
