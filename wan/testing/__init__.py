"""Tiny random-weight checkpoints in the exact official layout, for tests and ``--demo``."""
