"""Benchmarks: joblib-azurebatch beside dask and loky (``python -m bench.run``)."""
