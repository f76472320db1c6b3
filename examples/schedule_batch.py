"""A driver script: schedule a batch of tasks and wait for their results.

Run it against a running chronoray, from a shell on the cluster:
    python examples/schedule_batch.py --count 20
or through Ray's job API:
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 -- \
        python examples/schedule_batch.py --count 20
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timedelta, timezone

from chronoray import Client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--delay-s", type=float, default=2.0, help="first task runs this far ahead")
    parser.add_argument("--namespace", default="chronoray")
    parser.add_argument("--address", default="auto")
    args = parser.parse_args(argv)

    client = Client(args.address, namespace=args.namespace)
    client.register_script("batch-hello.sh", 'echo "hello from task $CHRONORAY_TASK_ID, $WHO"')
    start = datetime.now(timezone.utc) + timedelta(seconds=args.delay_s)
    tasks = client.submit_many(
        [
            {
                "script": "batch-hello.sh",
                "execute_at": start + timedelta(milliseconds=100 * i),
                "variables": {"WHO": f"n{i}"},
            }
            for i in range(args.count)
        ]
    )
    views = client.wait([t.task_id for t in tasks], timeout_s=120)
    summary = {
        "scheduled": len(tasks),
        "succeeded": sum(v.task.status.value == "succeeded" for v in views),
        "outputs": [v.runs[-1].output_tail.strip() for v in views if v.runs],
        "max_fire_lag_ms": max((v.runs[-1].fire_lag_ms or 0) for v in views if v.runs),
    }
    print(json.dumps(summary))
    return 0 if summary["succeeded"] == summary["scheduled"] else 1


if __name__ == "__main__":
    sys.exit(main())
