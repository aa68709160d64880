"""``python -m sed_dask ...``: the ``sed-dask`` command, where the console script is not on PATH."""

import sys

from sed_dask.cli import main

sys.exit(main())
