"""hpcpipe: submit a Dask features + torch DDP training pipeline to Slurm in one command."""

__version__ = "0.1.0"
