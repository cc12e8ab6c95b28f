"""Entry of the features step inside its allocation: `python -m hpcpipe.jobs.features --run-dir DIR`."""

from hpcpipe.runtime.entry import main
from hpcpipe.steps import features

if __name__ == "__main__":
    main("features", features.run)
