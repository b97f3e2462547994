"""A real `python -m service` process for the hostile-input suite, with the probes the suite needs:
the server's resident memory (current and peak since the last reset) and a byte-exact registry snapshot."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOKEN = "hostile-test-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, registry: Path, **settings: str):
        self.registry = registry
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A fixed mmap threshold makes glibc map every large buffer afresh (and unmap it on free) instead of
        # reusing freed heap, so a request's big allocations always show in the peak-RSS mark.
        env = os.environ | {"PROMPTSERVE_REGISTRY": str(registry), "PROMPTSERVE_ADMIN_TOKEN": TOKEN,
                            "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        env |= {f"PROMPTSERVE_{k.upper()}": v for k, v in settings.items()}
        self.process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(self.port)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited early:\n{self.process.stderr.read().decode()}")
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2)
                if response.status_code == 200:
                    return response.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("service did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    # --- memory ------------------------------------------------------------------------------------

    def _status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def reset_peak_rss(self) -> int:
        """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; returns that RSS in bytes."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        return self._status_kib("VmRSS") * 1024

    def peak_rss(self) -> int:
        return self._status_kib("VmHWM") * 1024


def registry_snapshot(root: Path) -> dict[str, str]:
    """Every path under the registry with a hash of its bytes (the lock file excluded)."""
    snapshot = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if relative == ".lock":
            continue
        snapshot[relative] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return snapshot
