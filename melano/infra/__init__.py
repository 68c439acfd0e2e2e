"""Plumbing: files and output folders, options and CLIs, checkpoints, signals, DDP, precision.

Nothing here knows about lesions, models or losses: no module in this package imports the
science (tests/test_layout.py checks it).
"""
