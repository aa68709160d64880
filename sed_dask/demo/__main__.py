"""``python -m sed_dask.demo [--quick] [-o DIR]`` (the same as ``sed-dask demo``)."""

from sed_dask.demo.pipeline import main

raise SystemExit(main())
