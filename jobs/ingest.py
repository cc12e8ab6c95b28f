"""Entry point of the ingest step inside its allocation: `python jobs/ingest.py --run-dir runs/<id>`."""

from hpcpipe import ingest
from hpcpipe.jobmain import main

if __name__ == "__main__":
    main("ingest", ingest.run)
