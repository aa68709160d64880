#!/usr/bin/env bash
# Fresh machine -> the embedded demo (trains, ingests, computes spectra, queries, writes a report).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q torch==2.13.0
python -m pip install -q -e . --constraint deploy/constraints.txt
sed-dask demo "$@"
