"""Directories a test and its scripts both see. A script's /tmp, /var/tmp
and /dev/shm are a tmpfs of its own (the sandbox's scratch quota), so what
tests share with scripts (ledgers, markers) lives elsewhere: under /var/lib
as root (`make test`), else in the temp directory (no tmpfs without root)."""

import os
import tempfile
from pathlib import Path

SHARED_ROOT = Path("/var/lib/chronoray-test") if os.geteuid() == 0 else Path(tempfile.gettempdir())


def shared_directory(prefix: str) -> Path:
    SHARED_ROOT.mkdir(mode=0o755, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=SHARED_ROOT))
    directory.chmod(0o777)
    return directory
