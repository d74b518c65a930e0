#!/usr/bin/env bash
# Runs the whole test suite. Installs what it needs into ./.venv first (Python >= 3.10).
#
# Coverage: pytest runs under coverage.py, and so does every Python process it starts (the
# servers above all); their data is combined and the report printed at the end. A run of the
# whole suite fails below `fail_under` (pyproject.toml); with arguments (a file, -k ...), which
# go to pytest, the report is only informative.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet -e '.[test]'
.venv/bin/ruff check sd_rest tests bench
# The packages' layers (pyproject.toml [tool.importlinter]): an upward import fails here.
.venv/bin/lint-imports --no-cache

# Coverage of the processes the tests start: this .pth file starts coverage.py in every Python
# process of the venv that inherits SD_REST_COVERAGE, but for the simulator's scripts (a .py
# file of its folder as the program; `-c` code run there is measured), which
# are not measured (omitted in pyproject.toml) and would pay coverage's start-up for each job.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat > "$site/sd_rest_coverage.pth" <<'PTH'
import os, sys; exec("a = sys.argv[0] if sys.argv else ''\nif os.environ.get('SD_REST_COVERAGE') and not (a.endswith('.py') and '/sd_rest/simulator/' in os.path.realpath(a)):\n import coverage\n os.environ['COVERAGE_PROCESS_START'] = os.environ['SD_REST_COVERAGE']\n try:\n  coverage.process_startup()\n finally:\n  del os.environ['COVERAGE_PROCESS_START']")
PTH
export SD_REST_COVERAGE="$PWD/pyproject.toml"
export SD_REST_ROOT="$PWD"  # where the measured source is, whatever a process's cwd
export COVERAGE_FILE="$PWD/.coverage"  # one place for every process's data, whatever its cwd
.venv/bin/python -m coverage erase
status=0
# Three test processes (SD_REST_TEST_WORKERS) on two cores: most tests wait on servers,
# scripts, worker hosts' heartbeats and Redis, not on the CPU (with the cluster's tests, three
# took 4 min 24 s here against 6 min for two); a file's tests stay in one process (its
# module-wide server with them).
workers=${SD_REST_TEST_WORKERS:-3}
.venv/bin/python -m coverage run -m pytest -n "$workers" --dist loadfile "$@" || status=$?
.venv/bin/python -m coverage combine --quiet
threshold=()
if [ $# -gt 0 ]; then
  threshold=(--fail-under=0)
fi
echo
# (macOS's bash 3.2 calls an empty array unbound under `set -u`, hence the +.)
if ! .venv/bin/python -m coverage report ${threshold[@]+"${threshold[@]}"}; then
  echo "coverage is below the threshold (fail_under in pyproject.toml)" >&2
  [ "$status" -ne 0 ] || status=2
fi
exit "$status"
