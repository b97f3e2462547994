"""The benchmark's peers install from exact pins with one command, and the GPU script parses and lists its steps
(it only runs where a GPU is lent)."""

import re
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"
PIN = re.compile(r"^[A-Za-z0-9_.-]+(\[[a-z,]+\])?==[0-9][\w.]*$")


@pytest.mark.parametrize("name", ["requirements-hf.txt", "requirements-infinity.txt"])
def test_peer_requirements_are_exact_pins(name):
    lines = [line for line in (BENCH / name).read_text().splitlines() if line and not line.startswith("#")]
    assert lines and [line for line in lines if not PIN.match(line)] == []


def test_the_install_script_uses_both_files_and_parses():
    script = (BENCH / "install_peers.sh").read_text()
    assert "requirements-hf.txt" in script and "requirements-infinity.txt" in script
    subprocess.run(["bash", "-n", str(BENCH / "install_peers.sh")], check=True)


def test_the_gpu_script_dry_run_lists_its_steps():
    out = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--dry-run"], check=True, capture_output=True, text=True)
    steps = out.stdout.splitlines()
    assert len(steps) == 3 and "--device cuda" in steps[1] and "train_memory.py" in steps[2]
