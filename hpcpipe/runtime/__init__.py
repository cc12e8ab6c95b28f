"""The job layer: what runs inside a job's allocation around a step.

One environment object (:mod:`hpcpipe.runtime.env`) answers every "where am I?" question; the
entry (:mod:`hpcpipe.runtime.entry`) builds it once and passes it to the step.
"""
