"""Surviving the Ray head's control plane: with GCS fault tolerance on (its
tables in Redis), a SIGKILL of the GCS server under a steady load and a
restart 15 s later lose nothing and start nothing twice. Chaos scenario 13
at reduced size, in a process of its own (it needs a Ray head of its own,
started with RAY_REDIS_ADDRESS)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_a_gcs_sigkill_and_restart_under_load_loses_nothing(tmp_path):
    if not os.environ.get("CHRONORAY_TEST_REDIS_ADDRESS"):
        pytest.fail("CHRONORAY_TEST_REDIS_ADDRESS is not set: run the suite with `make test`")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.chaos",
            "--only",
            "13",
            "--scale",
            "0.25",  # 30 s of load, the scenario's least
            "--any-postgres",
            "--services-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(done.stdout[-4000:])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    verdict = [line for line in done.stdout.splitlines() if line.startswith("| 13.")]
    assert verdict and verdict[-1].rstrip().endswith("| pass |"), done.stdout[-4000:]
    acknowledged = int(verdict[-1].split("|")[3])
    assert acknowledged > 200
