"""The report: PNG figures (``figures``) and the HTML/Markdown summary with its tables (``summary``)."""

from sed_dask.report.summary import make_report  # noqa: F401
