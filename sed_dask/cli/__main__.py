"""``python -m sed_dask.cli ...``: the ``sed-dask`` command."""

import sys

from sed_dask.cli import main

sys.exit(main())
