"""Entry of the ingest step inside its allocation: `python -m hpcpipe.jobs.ingest --run-dir DIR`."""

from hpcpipe.runtime.entry import main
from hpcpipe.steps import ingest

if __name__ == "__main__":
    main("ingest", ingest.run)
