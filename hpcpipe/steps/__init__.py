"""The pipeline's steps: synth (sample data), ingest, features (Dask) and train (torch DDP).

Each runs inside a job through :mod:`hpcpipe.runtime.entry`; docs/contracts.md is the contract
between them.
"""
