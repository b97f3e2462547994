#!/usr/bin/env bash
# Install the peers of bench/serving.py from the pinned files beside this script, in one command:
#   bench/install_peers.sh [PROJECT_VENV] [INFINITY_VENV]        (defaults: .venv and /tmp/infinity-venv)
# The Hugging Face pipeline goes into the project's venv; infinity-emb (numpy<2) into a venv of its own that sees the
# project's packages (torch above all) through a .pth file, so pip does not fetch a second torch. Then:
#   python bench/serving.py --infinity-python INFINITY_VENV/bin/python
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-.venv}
infinity=${2:-/tmp/infinity-venv}

"$venv/bin/pip" install -r "$here/requirements-hf.txt"
base=$("$venv/bin/python" -c 'import sys; print(sys._base_executable)')  # the interpreter the venv was made from
"$base" -m venv --system-site-packages "$infinity"
purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
"$venv/bin/python" -c "$purelib" > "$("$infinity/bin/python" -c "$purelib")/project.pth"
"$infinity/bin/pip" install -r "$here/requirements-infinity.txt"
echo "peers installed; run: python bench/serving.py --infinity-python $infinity/bin/python"
