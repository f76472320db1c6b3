import pytest

from tests.conftest import create_postgres_database


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

    with httpx.Client(base_url=deployment.url, timeout=30) as session:
        yield session
