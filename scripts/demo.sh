#!/usr/bin/env bash
# Starts the server in demo mode (the bundled simulator: no GPU, no model) on https://localhost:8888.
# Installs what it needs into ./.venv first (Python >= 3.10). Extra arguments go to the server.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e .
exec .venv/bin/stable-diffusion-rest-api --demo "$@"
