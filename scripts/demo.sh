#!/usr/bin/env bash
# Set up a virtual environment with celeriac, then walk through the seed scenario on the
# embedded default (no server needed).  EXAMPLE_SLEEP=10 gives the original 10 s tasks.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e .
exec .venv/bin/python examples/demo.py "$@"
