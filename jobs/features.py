"""Entry point of the features step inside its allocation: `python jobs/features.py --run-dir runs/<id>`."""

from hpcpipe import features
from hpcpipe.jobmain import main

if __name__ == "__main__":
    main("features", features.run)
