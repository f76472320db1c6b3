"""schemathesis over the OpenAPI document of the real deployment: valid
and invalid requests generated from the schema, as a user of its own and
as the administrator. No answer may be a 500, no invalid request may be
accepted, and every answer must be one the document declares."""

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance
from sqlalchemy import select

from storage.schema import api_tokens

pytestmark = [pytest.mark.ray, pytest.mark.postgres]

# 38 operations x 2 modes: ~850 requests. The suite must stay under 20
# minutes on a 2-core box: 32 each sent ~2,240 in 120-145 s, 20 each
# ~1,400 in 69-78 s, half of it the server's answers (~21 ms each).
MIN_REQUESTS = 800
EXAMPLES_PER_MODE = 12


@pytest.fixture(scope="session")
def fuzz_schema(deployment):
    schema = schemathesis.openapi.from_url(f"{deployment.url}/openapi.json")
    return schema


@pytest.fixture(scope="session")
def fuzz_headers(deployment):
    _, token = deployment.new_user("fuzz")
    admin = deployment.settings.admin_token
    return {
        "user": {"Authorization": f"Bearer {token}"},
        "admin": {"Authorization": f"Bearer {admin}"},
    }


# A raw script body is any bytes: schemathesis's "type-violating" body for it
# (an array, serialised as the bytes "[]") is a valid script, not invalid data.
ANY_BYTES = {"PUT /v1/scripts/{name}"}


def sparing(protected: set[int]):
    """The suite's other tests hold tokens of this deployment: the fuzz may
    revoke any token id but theirs (each such id is moved past every id)."""

    def spare(case):
        token_id = (case.path_parameters or {}).get("token_id")
        if isinstance(token_id, int) and token_id in protected:
            case.path_parameters["token_id"] = token_id + 10**12
        return case

    return spare


def fuzz_operation(operation, mode, headers, sent: list, protected: set[int]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode).map(sparing(protected)))
    @settings(
        max_examples=EXAMPLES_PER_MODE,
        deadline=None,
        derandomize=True,  # the same requests every run: a failure reproduces
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case):
        # positive_data_acceptance is left out: the schema cannot say that a
        # script must exist or a cron expression must parse, so a schema-valid
        # request may rightly be refused. Every other check runs.
        excluded = [positive_data_acceptance]
        if case.operation.label in ANY_BYTES:
            excluded.append(negative_data_rejection)
        case.call_and_validate(headers=headers, excluded_checks=excluded)
        sent.append(case.operation.label)

    run()


def test_fuzz_every_operation(deployment, fuzz_schema, fuzz_headers):
    """Each operation, with valid and with invalid data; failures are
    gathered so one run shows all of them."""
    with deployment.repo.engine.connect() as conn:
        protected = set(conn.execute(select(api_tokens.c.token_id)).scalars())
        already_revoked = set(
            conn.execute(
                select(api_tokens.c.token_id).where(api_tokens.c.revoked_at.is_not(None))
            ).scalars()
        )
    sent: list[str] = []
    failures = []
    seconds: dict[str, float] = {}
    for result in fuzz_schema.get_all_operations():
        operation = result.ok()
        admin_route = operation.path.startswith(("/v1/users", "/v1/tokens"))
        headers = fuzz_headers["admin" if admin_route else "user"]
        started = time.monotonic()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(operation, mode, headers, sent, protected)
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to get wrong (GET /healthz)
            except BaseException as exc:  # failures are exception groups; collected, reported below
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                failures.append(f"{operation.label} [{mode.value}]: {exc}")
        seconds[operation.label] = time.monotonic() - started
    print(f"schemathesis sent {len(sent)} requests over {len(set(sent))} operations")
    slowest = sorted(seconds.items(), key=lambda item: -item[1])[:6]
    print("slowest operations:", ", ".join(f"{label} {s:.1f} s" for label, s in slowest))
    assert not failures, "\n\n".join(failures)[:20000]
    assert len(sent) >= MIN_REQUESTS
    with deployment.repo.engine.connect() as conn:
        revoked = conn.execute(
            select(api_tokens.c.token_id).where(
                api_tokens.c.token_id.in_(protected), api_tokens.c.revoked_at.is_not(None)
            )
        ).scalars()
        assert set(revoked) <= already_revoked
