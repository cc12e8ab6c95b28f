"""Watch: reading a run (status, logs, summarize, plot). Fast and read-only towards the scheduler.

These modules never import the steps, the job runtime or a heavy library at import time, so
``hpcpipe status`` answers at once.
"""
