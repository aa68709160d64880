"""``python -m sed_dask.cli ...``: the ``sed-dask`` command."""
import sys

from . import main

sys.exit(main())
