"""Control: the commands that change a run on the login node (submit, rerun, cancel).

They plan and submit jobs through :mod:`hpcpipe.scheduler` and never import the steps or the
heavy libraries the steps use.
"""
