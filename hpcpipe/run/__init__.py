"""The run folder ``runs/<run-id>/``: its layout, its state file and lock, its metrics file.

Shared by every layer: control writes jobs into the state, watch reads it, the steps write their
outputs and metrics into the folder (docs/contracts.md says what each file holds).
"""
