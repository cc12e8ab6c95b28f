"""hpcpipe: submit a Dask features + torch DDP training pipeline to Slurm in one command."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# An installed wheel carries jobs/, sbatch/ and configs/ inside this package (setup.cfg maps
# them there). A source checkout keeps them beside it, and Python imports hpcpipe from the
# checkout whenever it is the working folder (`python -m hpcpipe.jobs.<step>` in a job submitted
# from a clone): let the checkout resolve hpcpipe.jobs, .sbatch and .configs as the wheel does.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "jobs").is_dir() and (_checkout / "jobs" / "__init__.py").is_file():
    __path__.append(str(_checkout))
