"""Flow-matching noise schedules: shifted sigma grids, the model timesteps and the MoE expert split.

A schedule is plain data. ``make_schedule(solver, steps, shift)`` returns a :class:`Schedule` with

* ``timesteps``: ``[steps]``, the value the DiT receives at loop step ``i`` (``schedule.timestep(i)``):
  int64 ``int64(1000 * sigma)`` truncated for ``unipc`` / ``dpm++``, exactly as the official pipelines;
  float32 ``1000 * sigma`` for ``euler``, as the Lightning fork feeds its DiT;
* ``sigmas``: float32 ``[steps + 1]``, the shifted sigmas followed by a final 0; the solvers use these
  exact values, not ``timesteps / 1000``;
* ``offset``: the index of the sigma the first solver step starts from (0, or 1 for the upstream
  duplicated-timestep quirk, see :func:`start_offset`); loop step ``i`` integrates from
  ``sigmas[i + offset]`` to ``sigmas[i + offset + 1]``;
* ``len(schedule)``: how many loop steps to run (``steps - offset``).

Grids (Wan 2.2 ``fm_solvers_unipc.py`` / ``fm_solvers.py``):

* ``unipc``: ``linspace(sigma_max, 0, steps + 1)[:-1]`` in float64 with ``sigma_max`` the float32 value of
  0.999 (the top of the 1000-step training grid), then shifted;
* ``dpm++``: ``linspace(1, 0, steps + 1)[:steps]`` in float64, then shifted (its first timestep is 1000).
* ``euler`` (the Lightning fork's ``EulerScheduler``, ``wan/utils/fm_solvers_euler.py``): float32
  ``linspace(1000, 0, steps + 1)``, ``sigma = t / 1000`` shifted in float32, timesteps ``1000 * sigma``
  in float32 (4 steps at shift 5: 1000, 937.5, 833.333, 625).

The shift is ``s * sigma / (1 + (s - 1) * sigma)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
# Upstream quirk: the UniPC grid starts at the float32 value of 0.999 (0.9990000128746033), read back as a
# Python float from the float32 training sigmas, not at 1.0.
UNIPC_SIGMA_MAX = float(torch.tensor(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32).item())
SOLVER_NAMES = ("unipc", "dpm++", "euler")

Expert = Literal["high", "low", "single"]


class UnknownSolverError(ValueError):
    """The requested sampling solver does not exist."""


def _linspace_head(start: float, stop: float, steps: int) -> torch.Tensor:
    """The first ``steps`` points of ``numpy.linspace(start, stop, steps + 1)`` in float64.

    Computed as numpy does (``i * step + start`` with ``step = (stop - start) / steps``) so that the
    truncated integer timesteps agree with the official ones bit for bit.
    """
    step = (stop - start) / steps
    return torch.arange(steps, dtype=torch.float64) * step + start


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching timestep shift ``s * sigma / (1 + (s - 1) * sigma)`` (maps 0 -> 0 and 1 -> 1)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def unipc_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Shifted float64 UniPC sigmas ``[steps]``: ``linspace(0.999f, 0, steps + 1)[:-1]``, then shifted."""
    return shift_sigmas(_linspace_head(UNIPC_SIGMA_MAX, 0.0, steps), shift)


def dpmpp_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Shifted float64 DPM++ sigmas ``[steps]``: ``linspace(1, 0, steps + 1)[:steps]``, then shifted.

    This is the official ``get_sampling_sigmas``; the scheduler's own config shift of 1 is the identity.
    """
    return shift_sigmas(_linspace_head(1.0, 0.0, steps), shift)


def euler_grid(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Lightning fork's Euler schedule: float32 timesteps ``[steps + 1]`` and sigmas ``[steps + 1]``.

    Same float32 operations in the same order as the fork (numpy's float32 linspace, then torch), so
    the values agree bit for bit; both end at 0.
    """
    ticks = torch.from_numpy(np.linspace(NUM_TRAIN_TIMESTEPS, 0, steps + 1, dtype=np.float32))
    sigmas = ticks / NUM_TRAIN_TIMESTEPS
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas * NUM_TRAIN_TIMESTEPS, sigmas


def model_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The integer timesteps the model receives: ``int64(1000 * sigma)``, truncated toward zero."""
    return (sigmas.to(torch.float64) * NUM_TRAIN_TIMESTEPS).to(torch.int64)


def start_offset(timesteps: torch.Tensor) -> int:
    """Index of the sigma the first solver step uses: 1 if ``timesteps[0]`` is duplicated, else 0.

    Upstream quirk: the official schedulers locate the first ``t`` in the timestep list and take the
    *second* match when it occurs twice (e.g. UniPC at 100 steps, shift 12: ``[999, 999, 998, ...]``), so
    every step then integrates one sigma further along and the last loop step has nothing left to do.
    """
    return 1 if int((timesteps == timesteps[0]).sum()) > 1 else 0


@dataclass(frozen=True)
class Schedule:
    """A sampling schedule: model timesteps, solver sigmas and the start offset (see module docstring)."""

    solver: str
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    offset: int

    def __len__(self) -> int:
        # Upstream quirk: with offset 1 the official loop crashes on its last step; the latent has already
        # reached sigma 0 one step earlier, so that step is dropped instead of running a useless forward.
        return len(self.timesteps) - self.offset

    def sigma_index(self, i: int) -> int:
        """Index into ``sigmas`` of the sigma loop step ``i`` starts from."""
        return i + self.offset

    def timestep(self, i: int) -> int | float:
        """The DiT timestep of loop step ``i`` as a Python number: int (unipc, dpm++) or float (euler)."""
        value = self.timesteps[i]
        return float(value) if value.is_floating_point() else int(value)


def make_schedule(solver: str, steps: int, shift: float) -> Schedule:
    """Build the schedule of ``solver`` ("unipc", "dpm++" or "euler") for ``steps`` steps at ``shift``."""
    if steps < 1:
        raise ValueError(f"sample steps must be at least 1, got {steps}: pass a positive step count")
    if solver == "euler":
        ticks, sigmas = euler_grid(steps, shift)
        timesteps = ticks[:-1].clone()
        return Schedule(solver=solver, timesteps=timesteps, sigmas=sigmas, offset=start_offset(timesteps))
    if solver == "unipc":
        grid = unipc_sigmas(steps, shift)
    elif solver == "dpm++":
        grid = dpmpp_sigmas(steps, shift)
    else:
        raise UnknownSolverError(f"unknown sample solver {solver!r}: use one of {', '.join(SOLVER_NAMES)}")
    timesteps = model_timesteps(grid)
    sigmas = torch.cat([grid, grid.new_zeros(1)]).to(torch.float32)
    return Schedule(solver=solver, timesteps=timesteps, sigmas=sigmas, offset=start_offset(timesteps))


def expert_for(t: float | torch.Tensor, boundary: float | None) -> Expert:
    """Which DiT handles timestep ``t``: "high" iff ``t >= boundary * 1000`` (inclusive), else "low".

    ``boundary`` is the config fraction (0.875 t2v-A14B, 0.9 i2v-A14B) or None for single-model tasks.
    ``t`` is compared as a number, as upstream's ``t.item() >= boundary`` (Euler timesteps are floats).
    """
    if boundary is None:
        return "single"
    return "high" if float(t) >= boundary * NUM_TRAIN_TIMESTEPS else "low"


def high_noise_steps(timesteps: Iterable[int] | torch.Tensor, boundary: float | None) -> int:
    """How many of ``timesteps`` go to the high-noise expert (0 for single-model tasks)."""
    return sum(expert_for(t, boundary) == "high" for t in timesteps)
