"""The HTTP floor of ``make bench-http``: plain uvicorn serving a FastAPI app
whose ``POST /v1/tasks`` parses the body and awaits one call to an actor on
the same Ray cluster, and answers 201. What any Ray-backed HTTP API pays at
the least, without Serve and without chronoray's own work.

    python -m bench.floor_http --ray-address 192.0.2.2:6379 --port 8123
"""

from __future__ import annotations

import argparse

import ray
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


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
