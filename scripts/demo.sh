#!/usr/bin/env bash
# Fresh machine -> the embedded demo (trains, ingests, computes spectra, queries, writes a report).
# torch as in test.sh: an installed one is kept; SED_DASK_TORCH_INDEX picks the index.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_setup.sh
sed_dask_venv
constraints="$(sed_dask_install_torch)"
python -m pip install -q -e . --constraint "$constraints"
sed-dask demo "$@"
