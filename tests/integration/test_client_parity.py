"""chronoray.Client offers what the HTTP API offers, over actor handles,
with typed results and the same errors; a token decides whose work it sees."""

import time

import pytest

from chronoray import Client
from scheduling.errors import (
    Forbidden,
    ScriptInUse,
    ScriptNotFound,
    TaskNotFound,
    Unauthorized,
)
from scheduling.models import Run, Script, Task, User
from service.core import Service

pytestmark = [pytest.mark.ray, pytest.mark.postgres]

# Each operation of the OpenAPI document and the Client method doing the same.
CLIENT_FOR = {
    ("post", "/v1/users"): "create_user",
    ("get", "/v1/users"): "list_users",
    ("get", "/v1/users/{user_id}"): "get_user",
    ("post", "/v1/users/{user_id}/tokens"): "issue_token",
    ("delete", "/v1/tokens/{token_id}"): "revoke_token",
    ("get", "/v1/me"): "me",
    ("post", "/v1/scripts"): "register_script",
    ("get", "/v1/scripts"): "list_scripts",
    ("put", "/v1/scripts/{name}"): "upload_script",
    ("get", "/v1/scripts/{name}"): "get_script",
    ("delete", "/v1/scripts/{name}"): "delete_script",
    ("get", "/v1/scripts/{name}/versions"): "script_versions",
    ("get", "/v1/scripts/{name}/body"): "script_body",
    ("post", "/v1/tasks"): "submit",
    ("post", "/sendTask"): "submit",
    ("get", "/v1/tasks"): "list_tasks",
    ("post", "/v1/tasks:batch"): "submit_batch",
    ("get", "/v1/tasks/{task_id}"): "get",
    ("delete", "/v1/tasks/{task_id}"): "cancel",
    ("get", "/v1/tasks/{task_id}/runs"): "runs",
    ("get", "/v1/tasks/{task_id}/runs/{attempt}/output"): "run_output",
    ("post", "/v1/tasks/{task_id}/retry"): "retry",
    ("get", "/v1/dead"): "dead",
    ("get", "/v1/executors"): "executors",
    ("post", "/v1/schedules"): "create_schedule",
    ("get", "/v1/schedules"): "list_schedules",
    ("get", "/v1/schedules/{schedule_id}"): "get_schedule",
    ("patch", "/v1/schedules/{schedule_id}"): "change_schedule",
    ("delete", "/v1/schedules/{schedule_id}"): "delete_schedule",
    ("post", "/v1/schedules/{schedule_id}/trigger"): "trigger_schedule",
    ("get", "/v1/schedules/{schedule_id}/preview"): "preview_schedule",
    ("get", "/v1/schedules/{schedule_id}/runs"): "schedule_history",
    ("post", "/v1/schedules/{schedule_id}/backfill"): "backfill_schedule",
    ("get", "/v1/schedules/{schedule_id}/audit"): "audit_schedule",
    ("get", "/v1/schedules:preview"): "preview_expression",
}
HTTP_ONLY = {("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")}


def test_every_http_operation_has_a_client_method(http):
    document = http.get("/openapi.json").json()
    operations = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert operations - HTTP_ONLY == set(CLIENT_FOR)
    missing = [name for name in CLIENT_FOR.values() if not callable(getattr(Client, name, None))]
    assert missing == []


def test_every_http_operation_is_named_after_the_service_method_it_calls(http):
    """One service method per operation, and its name is the operation id
    (a generated client gets ``submit_task``, not ``submit_v1_tasks_post``)."""
    document = http.get("/openapi.json").json()
    ids = {
        (method, path): operation["operationId"]
        for path, ops in document["paths"].items()
        for method, operation in ops.items()
        if (method, path) not in HTTP_ONLY
    }
    assert [i for i in ids.values() if not callable(getattr(Service, i, None))] == []
    assert len(set(ids.values())) == len(ids)
    untagged = [
        key
        for path, ops in document["paths"].items()
        for key, operation in ops.items()
        if not operation.get("tags")
    ]
    assert untagged == []


def test_tokens_decide_whose_work_a_client_sees(deployment):
    namespace = deployment.settings.namespace
    admin = Client(namespace=namespace, admin_token=deployment.settings.admin_token)
    ann = admin.create_user("Ann", "Client")
    assert isinstance(ann, User) and admin.get_user(ann.user_id) == ann
    _, ann_token = admin.issue_token(ann.user_id, label="driver")
    record, ben_token = admin.issue_token(admin.create_user("Ben", "Client").user_id)
    a = Client(namespace=namespace, token=ann_token)
    b = Client(namespace=namespace, token=ben_token)
    assert a.me().user_id == ann.user_id

    script = a.upload_script("parity.sh", b"echo parity $N")
    assert isinstance(script, Script) and script.version == 1
    a.upload_script("parity.sh", b"echo parity $N again")
    assert [s.version for s in a.script_versions("parity.sh")] == [2, 1]
    assert a.script_body("parity.sh", version=1) == b"echo parity $N"
    task = a.submit("parity.sh", time.time() + 1, variables={"N": "1"})
    assert isinstance(task, Task)
    [view] = a.wait([task.task_id], timeout_s=60)
    assert view.task.status.value == "succeeded"
    [run] = a.runs(task.task_id)
    assert isinstance(run, Run) and a.run_output(task.task_id, 1) == "parity 1 again\n"

    pending = a.submit("parity.sh", time.time() + 3600)
    with pytest.raises(ScriptInUse):
        a.delete_script("parity.sh")
    for call in (
        lambda: b.get(task.task_id),
        lambda: b.runs(task.task_id),
        lambda: b.run_output(task.task_id, 1),
        lambda: b.cancel(pending.task_id),
    ):
        with pytest.raises(TaskNotFound):
            call()
    with pytest.raises(ScriptNotFound):
        b.delete_script("parity.sh")
    with pytest.raises(ScriptNotFound):
        b.submit("parity.sh", time.time() + 60)
    assert b.list_tasks()[0] == [] and b.list_scripts() == []
    a.cancel(pending.task_id)
    assert a.delete_script("parity.sh") == 2

    with pytest.raises(Forbidden):
        a.create_user("Not", "Admin")
    admin.revoke_token(record.token_id)
    with pytest.raises(Unauthorized):
        Client(namespace=namespace, token=ben_token)
