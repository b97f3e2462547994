"""`python -m service` as a child process, for benchmarks and end-to-end tests: start it on a free port,
wait until it is ready, read its memory from /proc, stop it."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """The service on 127.0.0.1 with a registry directory and PROMPTSERVE_* settings given as keywords."""

    def __init__(self, registry: str | os.PathLike, env: dict[str, str] | None = None, open_files: int | None = None,
                 **settings: str):
        """`open_files` sets the process's open-files limit (soft and hard), as a container runtime would."""
        self.registry = Path(registry)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        variables = os.environ | (env or {}) | {"PROMPTSERVE_REGISTRY": str(registry)}
        variables |= {f"PROMPTSERVE_{k.upper()}": v for k, v in settings.items()}
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on a full pipe
        limit = None if open_files is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                                             (open_files, open_files))
        self.process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(self.port)], env=variables,
                                        stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=limit)

    def wait_ready(self, timeout: float = 180) -> dict:
        """The /readyz answer once the service gives one; raises with the service's output if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited early:\n{self.output()}")
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2)
                if response.status_code == 200:
                    return response.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("service did not become ready")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    # --- memory, from /proc (Linux) ----------------------------------------------------------------

    def _status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def open_descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def rss(self) -> int:
        return self._status_kib("VmRSS") * 1024

    def reset_peak_rss(self) -> int:
        """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; returns that RSS in bytes."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        return self.rss()

    def peak_rss(self) -> int:
        return self._status_kib("VmHWM") * 1024
