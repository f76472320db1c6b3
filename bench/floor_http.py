"""The HTTP floors of ``make bench-http``: a FastAPI app whose ``POST
/v1/tasks`` reads the body, awaits one call to an actor on the same Ray
cluster, and answers 201. Served two ways:

- by plain uvicorn (``main``): what any Ray-backed HTTP API pays at the
  least, without Serve and without chronoray's own work;
- as a Serve application beside chronoray's (``deploy_serve_floor``): the
  same ingress, proxy and replica machinery chronoray's requests go
  through, without chronoray's own work.

    python -m bench.floor_http --ray-address 192.0.2.2:6379 --port 8123
"""

# No `from __future__ import annotations`: the Serve floor's code is sent to
# its replica by value, and FastAPI must find `Request` in the annotation
# itself, not by name in globals the replica does not have.
import argparse
import sys

import httpx
import ray
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.ray_cluster import wait_for


@ray.remote(num_cpus=0)
class Echo:
    async def take(self, body: bytes) -> int:
        return len(body)


def app(echo) -> FastAPI:
    api = FastAPI()

    @api.post("/v1/tasks")
    async def take(request: Request) -> JSONResponse:
        size = await echo.take.remote(await request.body())
        return JSONResponse({"bytes": size}, status_code=201)

    return api


SERVE_FLOOR_PREFIX = "/floor"


def deploy_serve_floor(http_url: str, *, replicas: int = 1, timeout_s: float = 60.0) -> str:
    """The floor app as a Serve application at ``/floor`` on the running
    Serve (chronoray's, whose ingress it shares), with as many replicas as
    chronoray's; returns its base URL."""
    from ray import serve

    # A replica cannot import bench/ (not an installed package): send the code.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    @serve.deployment(
        ray_actor_options={"num_cpus": 0},  # as chronoray's replicas
        max_ongoing_requests=1000,
        logging_config={"enable_access_log": False},
    )
    @serve.ingress()
    class ServeFloor:
        def __init__(self, echo) -> None:
            self._echo = echo

        def __serve_build_asgi_app__(self):
            return app(self._echo)

    echo = Echo.remote()
    serve.run(
        ServeFloor.options(num_replicas=replicas).bind(echo),
        name="floor",
        route_prefix=SERVE_FLOOR_PREFIX,
        blocking=False,
    )
    url = f"{http_url}{SERVE_FLOOR_PREFIX}"
    wait_until_taking(url, timeout_s)
    return url


def wait_until_taking(url: str, timeout_s: float) -> None:
    """Until the floor at ``url`` answers ``POST /v1/tasks`` with 201;
    RuntimeError with its last answer if it does not within ``timeout_s``."""
    last = ["nothing"]

    def answers() -> bool:
        try:
            answer = httpx.post(f"{url}/v1/tasks", content=b"{}")
        except httpx.HTTPError as exc:
            last[0] = repr(exc)
            return False
        last[0] = f"{answer.status_code} {answer.text[:200]}"
        return answer.status_code == 201

    try:
        wait_for(answers, timeout_s=timeout_s, interval_s=0.3, what=f"a 201 from {url}")
    except TimeoutError as exc:
        raise RuntimeError(f"{exc}; the last answer: {last[0]}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ray-address", required=True)
    parser.add_argument("--namespace", default="chronoray-floor")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    ray.init(address=args.ray_address, namespace=args.namespace, logging_level="error")
    echo = Echo.remote()
    ray.get(echo.take.remote(b""))
    uvicorn.run(app(echo), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
