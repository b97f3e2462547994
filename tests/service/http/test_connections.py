"""Every connection, in every state, is closed by some timer; the connection cap fits the open-files limit; running
out of descriptors is one log line per interval. Against a real `python -m service` over TCP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import httpx
import pytest

from bench.process import ServiceProcess
from tests.helpers import PROBE_ENV

pytestmark = pytest.mark.slow
TIMEOUT_S = 1.0  # header, body, keep-alive and send timeouts of the server below
SLACK_S = 3.0
OPEN_FILES = 256  # the server's open-files limit (soft = hard, as a container may set it)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ServiceProcess:
    timeouts = {name: str(TIMEOUT_S) for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s")}
    process = ServiceProcess(tmp_path_factory.mktemp("connections") / "registry", env=PROBE_ENV,
                             open_files=OPEN_FILES, **timeouts)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def _connect(server: ServiceProcess, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", server.port))
    return sock


def _read_answer(sock: socket.socket) -> bytes:
    """One whole answer (headers and the body its Content-Length announces)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = int(lengths[0])
    while len(body) < length:
        body += sock.recv(65536)
    return head


def _until_closed(sock: socket.socket, limit_s: float) -> tuple[float, bytes]:
    """Seconds until the server closes the connection (raises if it stays open past `limit_s`), and what it sent."""
    start, received = time.monotonic(), b""
    sock.settimeout(limit_s)
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the connection was still open after {limit_s} s") from None
    return time.monotonic() - start, received


HEALTH_WITH_BODY = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
STATES: dict[str, Callable[[socket.socket], None]] = {
    "connected, nothing sent": lambda sock: None,
    "half a request line": lambda sock: sock.sendall(b"GET /heal"),
    "headers cut short": lambda sock: sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n"),
    "answered while owing a body, then one byte": lambda sock: (sock.sendall(HEALTH_WITH_BODY), _read_answer(sock),
                                                                 sock.sendall(b"x")),
    "answered while owing a body": lambda sock: (sock.sendall(HEALTH_WITH_BODY), _read_answer(sock)),
    "idle between keep-alive requests": lambda sock: (sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
                                                      _read_answer(sock)),
    "idle after a keep-alive request, then part of the next": lambda sock: (
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"), _read_answer(sock), sock.sendall(b"GET /")),
    "body trickling to a route that reads it": lambda sock: (
        sock.sendall(b"POST /v1/tasks/x/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{"), time.sleep(0.5), sock.sendall(b" ")),
}


@pytest.mark.parametrize("state", list(STATES))
def test_every_connection_state_is_closed_by_a_timer(server, state):
    with _connect(server) as sock:
        STATES[state](sock)
        elapsed, _ = _until_closed(sock, TIMEOUT_S + SLACK_S)
    assert elapsed <= TIMEOUT_S + SLACK_S
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_a_client_that_stops_reading_an_answer_is_disconnected(server):
    path = "/docs-assets/swagger-ui-bundle.js"
    size = len(httpx.get(f"{server.url}{path}", timeout=30).content)
    requests = 8  # pipelined, so the answers outgrow the kernel's socket buffers and the server's writes pause
    with _connect(server, receive_buffer=4096) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * requests)
        time.sleep(TIMEOUT_S + SLACK_S)  # never reading
        _, received = _until_closed(sock, SLACK_S)
    assert len(received) < requests * size  # cut off, not merely slow


def test_the_connection_cap_fits_the_open_files_limit(server):
    assert "connection cap set to 192" in server.output()  # 256 descriptors, 64 spare
    sockets, refused = [], 0
    try:
        for _ in range(300):
            sockets.append(_connect(server))
        time.sleep(0.5)
        assert server.open_descriptors() <= OPEN_FILES
        for sock in sockets:
            sock.settimeout(0.05)
            try:
                answer = sock.recv(4096)
            except (TimeoutError, ConnectionResetError):
                continue
            if answer.startswith(b"HTTP/1.1 503"):
                assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == "too_many_connections"
                refused += 1
    finally:
        for sock in sockets:
            sock.close()
    assert refused >= 300 - 192 - 64  # beyond the cap at once (a few may still wait in the listen backlog)
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    assert "Traceback" not in server.output()


def test_a_client_aborting_mid_body_is_counted_as_499_not_logged_as_a_500(server):
    for route in ("/v1/tasks/shapes/classify", "/v2/models/shapes/infer", "/v1/tasks/x/versions"):
        with _connect(server) as sock:
            sock.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         "Authorization: Bearer test-admin-token\r\nContent-Length: 100000\r\n\r\n{".encode())
            time.sleep(0.3)
    time.sleep(0.5)
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'status="499"' in metrics and 'status="500"' not in metrics
    assert "unhandled error" not in server.output() and "Traceback" not in server.output()


ACCEPTING_SERVER = textwrap.dedent("""
    import asyncio, logging, os, resource, sys
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    async def main():
        loop = asyncio.get_running_loop()
        if sys.argv[1] == "quiet":
            from service.http.server import AcceptFailures
            loop.set_exception_handler(AcceptFailures(interval_s=60))
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        open_now = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 2, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        await asyncio.sleep(3.5)

    asyncio.run(main())
""")


@pytest.mark.parametrize("handler", ["default", "quiet"])
def test_running_out_of_descriptors_logs_one_line_per_interval(handler):
    """asyncio retries a failed accept() every second; by default each failure logs a traceback."""
    process = subprocess.Popen([sys.executable, "-c", ACCEPTING_SERVER, handler], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    port = int(process.stdout.readline())
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    output = process.communicate(timeout=30)[0]
    for client in clients:
        client.close()
    if handler == "default":  # what the quiet handler is measured against
        assert output.count("Traceback") >= 3
    else:
        assert "Traceback" not in output and output.count("out of descriptors") == 1, output
