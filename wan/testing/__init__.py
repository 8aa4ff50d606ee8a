"""Helpers for tests, benchmarks and ``--demo`` that the runtime itself never uses: tiny random-weight
checkpoints in the exact official layout, upstream reference values (`reference`), already-placed
models for the sampling loop (`models.StaticModels`) and a record of block streaming (`stream_log`)."""
