"""infinity-emb as a peer: its server on 127.0.0.1 serving a local HF CLIP folder, fed the same JPEG over HTTP.

infinity-emb pins numpy<2 and older transformers, so it cannot share the project's environment; install it in a
throwaway one that sees the project's torch and pass that interpreter with --infinity-python (docs/serving.md).
"""

from __future__ import annotations

import base64
import os
import subprocess
import tempfile
from pathlib import Path

from bench.timing import wait_until_answering

MODEL_NAME = "clip"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
               "INFINITY_ANONYMOUS_USAGE_STATS": "0"}


def missing_reason(python: str) -> str | None:
    """Why infinity-emb cannot run under `python`, or None when it can be imported there."""
    try:
        probe = subprocess.run([python, "-c", "import infinity_emb.cli"], capture_output=True, text=True, timeout=120,
                               env=os.environ | OFFLINE_ENV)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{python} could not be run: {error}"
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["no error output"])[-1]
        return f"infinity-emb is not importable with {python} ({last})"
    return None


def embeddings_body(image: bytes) -> dict:
    """One image as a data URI in infinity's OpenAI-style /embeddings request."""
    uri = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    return {"model": MODEL_NAME, "input": [uri], "modality": "image"}


def start_infinity(python: str, model_dir: Path, port: int, batch: int) -> tuple[subprocess.Popen, str]:
    """Start the server; on failure raise RuntimeError carrying the end of its log, the reason to print."""
    log = tempfile.TemporaryFile()
    command = [python, "-m", "infinity_emb.cli", "v2", "--model-id", str(model_dir), "--served-model-name",
               MODEL_NAME, "--engine", "torch", "--device", "cpu", "--batch-size", str(batch), "--no-model-warmup",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env=os.environ | OFFLINE_ENV, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if wait_until_answering(process, f"{url}/models"):
        return process, url
    process.kill()
    process.wait()
    log.seek(0)
    tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
    raise RuntimeError("infinity-emb did not start: " + " / ".join(tail))
