"""Results: the xarray Dataset of window spectra over (run, step, window), built from engine output.

``spectra`` (``sed_dask.spectrum``) runs the Gram pass and builds the Dataset of docs/result_schema.md;
``sketch_spectra`` builds the same Dataset from a JL sketch, and the JL error report.
"""
