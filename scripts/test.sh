#!/usr/bin/env bash
# Fresh machine -> passing tests. Installs torch first (an installed one is kept; the CPU build
# where the machine or SED_DASK_TORCH_INDEX offers it) so that nothing else picks a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_setup.sh
sed_dask_venv
constraints="$(sed_dask_install_torch)"
python -m pip install -q -e ".[test]" --constraint "$constraints"
python -m ruff check .          # lint first: CI fails on a lint error before spending 15 min
python -m pytest -q "$@"
