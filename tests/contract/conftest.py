"""One storage suite over every backend: SQLite and a real PostgreSQL (a
fresh database per test). There is no in-memory fake: it re-implemented
the state machine and idempotency, which is what this suite checks."""

import pytest
from sqlalchemy import create_engine, text

from storage.engines import make_engine
from storage.migrate import upgrade
from storage.sql import SqlTaskRepository
from tests.conftest import postgres_admin_url

TEMPLATE = "chronoray_contract_template"


@pytest.fixture(scope="session")
def postgres_template():
    """Migrate once; each test clones the template (fast, and proves the
    migration on PostgreSQL)."""
    admin = postgres_admin_url()
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{TEMPLATE}"'))
        conn.execute(text(f'CREATE DATABASE "{TEMPLATE}"'))
    template_engine = make_engine(admin.rsplit("/", 1)[0] + f"/{TEMPLATE}")
    upgrade(template_engine)
    template_engine.dispose()
    yield engine
    engine.dispose()


def _repository(kind, request, tmp_path):
    if kind == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'contract.db'}")
        upgrade(engine)
    else:
        admin = request.getfixturevalue("postgres_template")
        name = f"contract_{abs(hash(request.node.nodeid)) % 10**12}"
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"'))
        engine = make_engine(postgres_admin_url().rsplit("/", 1)[0] + f"/{name}")
    return SqlTaskRepository(engine), engine


POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)


@pytest.fixture(params=["sqlite", POSTGRES])
def repo(request, tmp_path):
    repository, engine = _repository(request.param, request, tmp_path)
    yield repository
    engine.dispose()


@pytest.fixture(params=[POSTGRES])
def postgres_repo(request, tmp_path):
    """For races between transactions: SQLite serializes its writers."""
    repository, engine = _repository(request.param, request, tmp_path)
    yield repository
    engine.dispose()
