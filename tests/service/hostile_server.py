"""The service process the hostile-input suite attacks, and a byte-exact registry snapshot."""

from __future__ import annotations

import hashlib
from pathlib import Path

from service.process import ServiceProcess

TOKEN = "hostile-test-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
# A fixed mmap threshold makes glibc map every large buffer afresh (and unmap it on free) instead of reusing
# freed heap, so a request's big allocations always show in the peak-RSS mark.
PROBE_ENV = {"PROMPTSERVE_ADMIN_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


def hostile_server(registry: Path, **settings: str) -> ServiceProcess:
    return ServiceProcess(registry, env=PROBE_ENV, **settings)


def registry_snapshot(root: Path) -> dict[str, str]:
    """Every path under the registry with a hash of its bytes (the lock file excluded)."""
    snapshot = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if relative == ".lock":
            continue
        snapshot[relative] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return snapshot
