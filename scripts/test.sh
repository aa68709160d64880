#!/usr/bin/env bash
# Fresh machine -> passing tests. Installs the CPU torch wheel first so that nothing pulls CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]" --constraint deploy/constraints.txt
python -m pytest -q "$@"
