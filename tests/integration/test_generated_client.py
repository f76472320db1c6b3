"""An outside user's view of the OpenAPI document: openapi-python-client
generates a client from the live /openapi.json without warnings, its
functions are named after the operations (submit_task, not
submit_v1_tasks_post), and a task submitted with it runs."""

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.postgres]
BIN = Path(sys.executable).parent  # the generator, and the ruff it formats with


@pytest.fixture(scope="module")
def generated(http, tmp_path_factory):
    where = tmp_path_factory.mktemp("generated")
    document = where / "openapi.json"
    document.write_text(json.dumps(http.get("/openapi.json").json()))
    done = subprocess.run(
        [BIN / "openapi-python-client", "generate", "--path", document, "--meta", "none"]
        + ["--output-path", where / "chronoray_api"],
        capture_output=True,
        text=True,
        cwd=where,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    sys.path.insert(0, str(where))
    try:
        yield importlib.import_module("chronoray_api")
    finally:
        sys.path.remove(str(where))


def test_a_generated_client_submits_a_task_that_runs(generated, deployment):
    from chronoray_api.api.scripts import upload_script
    from chronoray_api.api.tasks import get_task, submit_task
    from chronoray_api.models import TaskIn, TaskInVariables
    from chronoray_api.types import File

    api = generated.AuthenticatedClient(base_url=deployment.url, token=deployment.token)
    body = File(payload=b"echo generated $WHO", mime_type="application/octet-stream")
    uploaded = upload_script.sync_detailed("generated.sh", client=api, body=body)
    assert uploaded.status_code in (200, 201), uploaded.content

    variables = TaskInVariables.from_dict({"WHO": "client"})
    task = TaskIn(script="generated.sh", execute_at=time.time() + 1, variables=variables)
    submitted = submit_task.sync_detailed(client=api, body=task)
    assert submitted.status_code == 201, submitted.content
    task_id = json.loads(submitted.content)["task_id"]

    deadline = time.monotonic() + 60
    while True:
        view = json.loads(get_task.sync_detailed(task_id, client=api).content)
        if view["status"] in ("succeeded", "dead") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert view["status"] == "succeeded" and view["output"].strip() == "generated client"
