"""A real streaming replica serves the queries and refuses writes; a read
right after the caller's own write is served consistently; /readyz follows
a PostgreSQL that stops and comes back."""

import time
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, text
from sqlalchemy.exc import InternalError, OperationalError

from scheduling.errors import TaskNotFound, Unavailable
from scheduling.models import Interpreter, NewTask
from serve_app.app import create_api
from service.auth import issue_token
from service.core import Service
from storage.engines import make_engine, make_replica_engine
from storage.migrate import upgrade
from storage.repository import TaskQuery
from storage.schema import users
from storage.sql import SqlTaskRepository
from tests.pg_cluster import PgServer, wait_until
from tests.unit.fakes import RepoRouter

pytestmark = [pytest.mark.postgres]


def now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def primary_and_replica():
    primary = PgServer.primary()
    replica = None
    try:
        upgrade(make_engine(primary.url))
        replica = primary.replica()
        yield primary, replica
    finally:
        if replica is not None:
            replica.remove()
        primary.remove()


def replayed(primary_engine, replica_engine) -> bool:
    with primary_engine.connect() as p, replica_engine.connect() as r:
        position = p.execute(text("SELECT pg_current_wal_lsn()::text")).scalar()
        return r.execute(
            text("SELECT pg_last_wal_replay_lsn() >= CAST(:p AS pg_lsn)"), {"p": position}
        ).scalar()


def set_replay(replica_engine, paused: bool) -> None:
    with replica_engine.connect() as conn:
        conn.execute(text(f"SELECT pg_wal_replay_{'pause' if paused else 'resume'}()"))


def replicated_task(primary, replica, name: str):
    """A repository reading from the replica, a new user with a script and
    a task due in an hour, replayed on the replica."""
    primary_engine, replica_engine = make_engine(primary.url), make_replica_engine(replica.url)
    repo = SqlTaskRepository(primary_engine, read_engines=[replica_engine])
    owner = repo.add_user(first_name=name, last_name="Replica", now=now()).user_id
    repo.add_script(
        owner_id=owner, name="r.sh", interpreter=Interpreter.BASH, body=b"true", now=now()
    )
    due = now() + timedelta(hours=1)
    [added] = repo.add_tasks(
        [NewTask(owner_id=owner, script_name="r.sh", execute_at=due)], now=now()
    )
    wait_until(lambda: replayed(primary_engine, replica_engine), timeout_s=30, what="replay")
    return repo, owner, added, due


def test_queries_go_to_the_replica_writes_to_the_primary(primary_and_replica):
    repo, owner, first, due = replicated_task(*primary_and_replica, "Rita")
    primary_engine, replica_engine = repo.engine, repo.read_engines[0]
    assert [t.task_id for t in repo.list_tasks(TaskQuery(owner_id=owner))] == [first.task.task_id]

    # with replay paused, a write on the primary is invisible to reads: they
    # are served by the replica
    set_replay(replica_engine, paused=True)
    try:
        [second] = repo.add_tasks(
            [NewTask(owner_id=owner, script_name="r.sh", execute_at=due)], now=now()
        )
        listed = [t.task_id for t in repo.list_tasks(TaskQuery(owner_id=owner))]
        assert listed == [first.task.task_id]
        with pytest.raises(TaskNotFound):
            repo.get_task(second.task.task_id, owner_id=owner)
        # the caller's own write, noted: its reads go to the primary until
        # the replica has replayed it
        repo.note_write(owner)
        assert repo.get_task(second.task.task_id, owner_id=owner).task_id == second.task.task_id
        listed = [t.task_id for t in repo.list_tasks(TaskQuery(owner_id=owner))]
        assert listed == [second.task.task_id, first.task.task_id]
    finally:
        set_replay(replica_engine, paused=False)
    wait_until(lambda: replayed(primary_engine, replica_engine), timeout_s=30, what="replay")
    assert repo.databases.reader(owner) is replica_engine  # caught up: back on the replica

    # the replica refuses writes
    with pytest.raises((InternalError, OperationalError), match="read-only transaction"):
        with replica_engine.begin() as conn:
            conn.execute(insert(users).values(first_name="x", last_name="y", created_at=now()))
    with pytest.raises(Exception, match="read-only transaction"):
        SqlTaskRepository(replica_engine).add_user(first_name="x", last_name="y", now=now())


def test_get_after_create_over_http_is_consistent_with_a_lagging_replica(primary_and_replica):
    primary, replica = primary_and_replica
    primary_engine, replica_engine = make_engine(primary.url), make_replica_engine(replica.url)
    repo = SqlTaskRepository(primary_engine, read_engines=[replica_engine])
    owner = repo.add_user(first_name="Hal", last_name="Http", now=now()).user_id
    _, token = issue_token(repo, user_id=owner, label="t", now=now())
    from chronoray.settings import Settings

    api = TestClient(
        create_api(
            Service(
                repo=repo,
                router=RepoRouter(repo, now),
                settings=Settings(database_url=primary.url),
            )
        ),
        headers={"Authorization": f"Bearer {token}"},
    )
    wait_until(lambda: replayed(primary_engine, replica_engine), timeout_s=30, what="replay")
    set_replay(replica_engine, paused=True)
    try:
        script = api.put(
            "/v1/scripts/h.sh", content=b"true", headers={"content-type": "text/plain"}
        )
        assert script.status_code == 201
        assert api.get("/v1/scripts/h.sh").status_code == 200  # own write, read back
        created = api.post(
            "/v1/tasks:batch",
            json={"tasks": [{"script": "h.sh", "execute_at": time.time() + 3600}]},
        )
        assert created.status_code == 201, created.text
        task_id = created.json()["tasks"][0]["task_id"]
        assert api.get(f"/v1/tasks/{task_id}").status_code == 200
        assert [t["task_id"] for t in api.get("/v1/tasks").json()["tasks"]] == [task_id]
        with pytest.raises(TaskNotFound):  # the replica itself has not seen it
            SqlTaskRepository(replica_engine).get_task(task_id)
    finally:
        set_replay(replica_engine, paused=False)


def test_reads_go_to_the_primary_while_the_replica_is_down(primary_and_replica):
    _, replica = primary_and_replica
    repo, owner, added, _ = replicated_task(*primary_and_replica, "Dora")
    primary_engine, replica_engine = repo.engine, repo.read_engines[0]
    replica.stop(mode="immediate")
    try:
        listed = repo.list_tasks(TaskQuery(owner_id=owner))
        assert [t.task_id for t in listed] == [added.task.task_id]
        assert repo.get_task(added.task.task_id, owner_id=owner).task_id == added.task.task_id
        assert (
            repo.databases.reader(owner) is primary_engine
        )  # skipped for a while, not asked again
    finally:
        replica.start()
    wait_until(lambda: replayed(primary_engine, replica_engine), timeout_s=30, what="replay")


@pytest.mark.ray
def test_readyz_is_503_within_5_s_of_postgres_stopping_and_200_after(deployment):
    """The real actors of the session deployment, and a PostgreSQL of this
    test's own that it stops and starts."""
    from actors.handles import ShardRouter

    server = PgServer.primary()
    try:
        engine = make_engine(server.url)
        upgrade(engine)
        repo = SqlTaskRepository(engine)
        api = TestClient(
            create_api(
                Service(
                    repo=repo,
                    router=ShardRouter(
                        wheel=deployment.settings.wheel, namespace=deployment.settings.namespace
                    ),
                    settings=deployment.settings.with_(database_url=server.url),
                )
            )
        )
        assert api.get("/readyz").status_code == 200, api.get("/readyz").text
        server.stop(mode="immediate")
        stopped_at = time.monotonic()
        wait_until(lambda: api.get("/readyz").status_code == 503, timeout_s=5, what="503")
        print(f"503 after {time.monotonic() - stopped_at:.2f} s")
        answer = api.get("/readyz")
        assert answer.headers["retry-after"] == "5"
        assert answer.json()["checks"]["database"].startswith("unavailable")
        assert answer.json()["checks"]["dispatcher"] == "ok"
        with pytest.raises(Unavailable):
            repo.ping()
        server.start()
        took = wait_until(lambda: api.get("/readyz").status_code == 200, timeout_s=30, what="200")
        print(f"200 again {took:.2f} s after the restart")
    finally:
        server.remove()
