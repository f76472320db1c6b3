"""Users, tokens, the script catalogue and the counts behind the caps: the
same contract on every backend."""

from datetime import timedelta

import pytest

from scheduling.errors import ScriptInUse, ScriptNotFound, TokenNotFound, UserNotFound
from scheduling.models import Interpreter, NewTask, SubmitResult
from service.auth import issue_token, token_hash
from tests.conftest import T0


def add(repo, owner, name, body):
    return repo.add_script(
        owner_id=owner, name=name, interpreter=Interpreter.BASH, body=body, now=T0
    )


def test_tokens_resolve_to_their_user_until_revoked(repo):
    user = repo.add_user(first_name="Grace", last_name="Hopper", now=T0)
    assert repo.get_user(user.user_id) == user and user in repo.list_users()
    record, token = issue_token(repo, user_id=user.user_id, label="ci", now=T0)
    assert repo.user_for_token(token_hash(token)) == user.user_id
    assert repo.user_for_token(token_hash(token + "x")) is None
    revoked = repo.revoke_token(record.token_id, now=T0 + timedelta(seconds=1))
    assert revoked.revoked_at is not None
    assert repo.user_for_token(token_hash(token)) is None
    assert repo.revoke_token(record.token_id, now=T0).revoked_at == revoked.revoked_at
    with pytest.raises(TokenNotFound):
        repo.revoke_token(10**9, now=T0)
    with pytest.raises(UserNotFound):
        repo.add_token(user_id=10**9, token_hash="0" * 64, label="", now=T0)
    with pytest.raises(UserNotFound):
        repo.get_user(10**9)


def test_script_versions_list_and_delete_when_unused(repo):
    owner = repo.ensure_user(first_name="ada", last_name="lovelace", now=T0)
    other = repo.ensure_user(first_name="bob", last_name="b", now=T0)
    add(repo, owner, "a.sh", b"echo 1")
    add(repo, owner, "a.sh", b"echo 2")
    add(repo, owner, "b.sh", b"echo b")
    add(repo, other, "a.sh", b"echo other")
    assert [s.version for s in repo.script_versions(owner_id=owner, name="a.sh")] == [2, 1]
    assert [(s.name, s.version) for s in repo.list_scripts(owner_id=owner)] == [
        ("a.sh", 2),
        ("b.sh", 1),
    ]
    assert repo.get_script(owner_id=owner, name="a.sh", version=1).sha256 != (
        repo.get_script(owner_id=owner, name="a.sh").sha256
    )
    [result] = repo.add_tasks(
        [NewTask(owner_id=owner, script_name="a.sh", execute_at=T0 + timedelta(hours=1))], now=T0
    )
    assert isinstance(result, SubmitResult)
    assert repo.count_active(owner)[0] == 1 and repo.count_active(other)[0] == 0
    with pytest.raises(ScriptInUse):
        repo.delete_script(owner_id=owner, name="a.sh", now=T0)
    repo.cancel_task(result.task.task_id, owner_id=owner, now=T0)
    assert repo.count_active(owner)[0] == 0
    assert repo.delete_script(owner_id=owner, name="a.sh", now=T0) == 2
    with pytest.raises(ScriptNotFound):
        repo.get_script(owner_id=owner, name="a.sh")
    with pytest.raises(ScriptNotFound):
        repo.delete_script(owner_id=owner, name="a.sh", now=T0)
    assert repo.get_script(owner_id=other, name="a.sh").version == 1  # another owner's
    again, created = add(repo, owner, "a.sh", b"echo 1")
    assert created and again.version == 3  # a version number never names two bodies
    assert repo.get_task(result.task.task_id, owner_id=owner).script_name == "a.sh"
