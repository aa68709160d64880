"""The embedded demo: train small grokking transformers (``train``), then ingest, analyse and report
them (``pipeline``); ``sed-dask demo`` runs it."""
