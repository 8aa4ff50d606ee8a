"""Model sources for `wan.sampling.sample` in tests and benchmarks."""

from __future__ import annotations

from torch import nn


class StaticModels:
    """Models that are already placed: {"high": m, "low": m} or {"single": m}."""

    def __init__(self, models: dict[str, nn.Module]):
        self.models = models

    def activate(self, expert: str) -> nn.Module:
        return self.models[expert]
