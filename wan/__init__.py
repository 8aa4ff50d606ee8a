"""Wan 2.2 runtime: transformer, text encoder, VAEs, schedules, solvers and the shared sampling loop.

Imports are lazy so that ``import wan`` stays cheap; the public loaders are re-exported here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_text_encoder", "load_transformer", "load_vae"]


def load_transformer(*args: Any, **kwargs: Any):
    from wan.loading import load_transformer as _load

    return _load(*args, **kwargs)


def load_text_encoder(*args: Any, **kwargs: Any):
    from wan.text_encoder import load_text_encoder as _load

    return _load(*args, **kwargs)


def load_vae(*args: Any, **kwargs: Any):
    from wan.vae import load_vae as _load

    return _load(*args, **kwargs)
