"""Entry point of the train step inside its allocation: `python jobs/train.py --run-dir runs/<id>`."""

from hpcpipe import train
from hpcpipe.jobmain import main

if __name__ == "__main__":
    main("train", train.run)
