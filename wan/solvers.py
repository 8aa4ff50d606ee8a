"""Multistep ODE solvers for flow-matching sampling, as pure functions with explicit history.

The sampling loop drives them like this (``make_schedule`` is in :mod:`wan.schedule`)::

    sched = make_schedule(solver, steps, shift)
    state = initial_state()
    for i in range(len(sched)):
        v = model(x, t=sched.timesteps[i])
        x, state = step(solver, x, v, sched, i, state)

``v`` is the predicted velocity (flow) at the current sample; ``state`` is an immutable
:class:`SolverState` holding the previous data predictions, so a step never mutates anything.

Solvers (numerically as the Wan 2.2 ``FlowUniPCMultistepScheduler`` / ``FlowDPMSolverMultistepScheduler``
with the pipelines' settings; scalar math is done on 0-d float32 tensors in the same order, so that
trajectories agree to float32 rounding):

* ``unipc`` (default): UniPC with the B(h) = expm1(h) variant ("bh2"), order 2, data (x0) prediction,
  the UniC corrector from the second step on, first order on the first and the last step;
* ``dpm++``: DPM-Solver++ 2M (midpoint), data prediction, first order on the first and the last step;
* ``euler``: the first-order flow-matching Euler step of the Lightning fork's ``EulerScheduler``
  (``x + (sigma_next - sigma) * v`` in float32), no history; the 4-step distilled recipe's solver.

Both work in half-log-SNR ``lambda = log(1 - sigma) - log(sigma)``; the step to sigma 0 returns the
data prediction exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from wan.schedule import Schedule

SOLVER_ORDER = 2


@dataclass(frozen=True)
class SolverState:
    """The history a multistep solver carries from one step to the next (plain, immutable).

    ``x0_preds``: data predictions of the previous steps, newest last, at most ``SOLVER_ORDER``.
    ``last_sample``: UniPC only, the sample the previous predictor started from (the corrector redoes
    that step with the new model output). ``last_order``: UniPC only, the order of the previous predictor.
    """

    x0_preds: tuple[torch.Tensor, ...] = ()
    last_sample: torch.Tensor | None = None
    last_order: int = 0


class StepFunction(Protocol):
    def __call__(
        self, x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, k: int, state: SolverState
    ) -> tuple[torch.Tensor, SolverState]: ...


def initial_state() -> SolverState:
    """The empty history every sampling run starts from."""
    return SolverState()


def to_x0(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Data prediction from a flow prediction: ``x0 = x - sigma * v`` (since ``x = (1 - sigma) x0 + sigma n``)."""
    return x - sigma * v


def _half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """``lambda = log(alpha) - log(sigma)`` with ``alpha = 1 - sigma``; -inf at sigma 1, +inf at sigma 0."""
    return torch.log(1 - sigma) - torch.log(sigma)


def _unipc_predict(
    x: torch.Tensor, x0_preds: tuple[torch.Tensor, ...], sigmas: torch.Tensor, k: int, order: int
) -> torch.Tensor:
    """UniP-bh2 predictor from ``sigmas[k]`` to ``sigmas[k + 1]`` (order 1 or 2, data prediction)."""
    sigma_t, sigma_s0 = sigmas[k + 1], sigmas[k]
    alpha_t = 1 - sigma_t
    lambda_s0 = _half_log_snr(sigma_s0)
    h = _half_log_snr(sigma_t) - lambda_s0
    h_phi_1 = torch.expm1(-h)
    b_h = torch.expm1(-h)
    m0 = x0_preds[-1]
    x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    if order == 2:
        r_k = (_half_log_snr(sigmas[k - 1]) - lambda_s0) / h
        d1 = (x0_preds[-2] - m0) / r_k
        # bh2 at order 2 uses the fixed rho_p = 0.5 (no linear solve), as upstream.
        x_t = x_t - alpha_t * b_h * (0.5 * d1)
    return x_t.to(x.dtype)


def _unipc_correct(x0: torch.Tensor, state: SolverState, sigmas: torch.Tensor, k: int) -> torch.Tensor:
    """UniC-bh2 corrector: redo the step ``sigmas[k - 1] -> sigmas[k]`` using the new prediction ``x0``."""
    order = state.last_order
    last_sample = state.last_sample
    assert last_sample is not None
    sigma_t, sigma_s0 = sigmas[k], sigmas[k - 1]
    alpha_t = 1 - sigma_t
    lambda_s0 = _half_log_snr(sigma_s0)
    h = _half_log_snr(sigma_t) - lambda_s0
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)
    m0 = state.x0_preds[-1]

    if order == 1:
        rhos = torch.tensor([0.5], dtype=last_sample.dtype)
        d1 = None
    else:
        r_k = (_half_log_snr(sigmas[k - 2]) - lambda_s0) / h
        d1 = (state.x0_preds[-2] - m0) / r_k
        rks = torch.stack([r_k, torch.ones_like(r_k)])
        # Coefficients b_i = i! * h*phi_{i+1}(h) / B(h), the UniC order conditions, solved in float32.
        rows, rhs = [], []
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        for i in range(1, order + 1):
            rows.append(torch.pow(rks, i - 1))
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        rhos = torch.linalg.solve(torch.stack(rows), torch.stack(rhs)).to(last_sample.dtype)

    x_t = sigma_t / sigma_s0 * last_sample - alpha_t * h_phi_1 * m0
    residual = rhos[-1] * (x0 - m0)
    if d1 is not None:
        residual = rhos[0] * d1 + residual
    x_t = x_t - alpha_t * b_h * residual
    return x_t.to(last_sample.dtype)


def unipc_step(
    x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, k: int, state: SolverState
) -> tuple[torch.Tensor, SolverState]:
    """One UniPC (bh2, order 2, predict-x0) step from ``sigmas[k]`` to ``sigmas[k + 1]``.

    ``sigmas`` is the float32 schedule with the final 0 (``[steps + 1]``). The corrector first refines
    ``x`` with the new prediction (from the second step on), then the predictor advances it; the order
    warms up from 1 and drops to 1 on the last step (``lower_order_final``).
    """
    num_steps = len(sigmas) - 1
    if k >= num_steps:
        # Upstream quirk (duplicated first timestep): the official code asserts here; x is at sigma 0.
        return x, state
    x0 = to_x0(x, v, sigmas[k])
    if k > 0 and state.last_sample is not None:
        x = _unipc_correct(x0, state, sigmas, k)
    order = min(SOLVER_ORDER, num_steps - k, len(state.x0_preds) + 1)
    x0_preds = (*state.x0_preds, x0)[-SOLVER_ORDER:]
    x_next = _unipc_predict(x, x0_preds, sigmas, k, order)
    return x_next, SolverState(x0_preds=x0_preds, last_sample=x, last_order=order)


def dpmpp_step(
    x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, k: int, state: SolverState
) -> tuple[torch.Tensor, SolverState]:
    """One DPM-Solver++ 2M (midpoint, data prediction) step from ``sigmas[k]`` to ``sigmas[k + 1]``.

    First order on the first and the last step. The grid starts at sigma 1, where ``alpha = 0`` and
    ``lambda = -inf``: the first step is ``sigma_t * x + alpha_t * x0`` and on the second step the
    second-order term vanishes (``r0 = inf``); the IEEE inf arithmetic gives that without NaNs.
    """
    num_steps = len(sigmas) - 1
    if k >= num_steps:
        # Upstream quirk (duplicated first timestep): the official code indexes past the sigmas here.
        return x, state
    x0 = to_x0(x, v, sigmas[k])
    x0_preds = (*state.x0_preds, x0)[-SOLVER_ORDER:]
    sample = x.to(torch.float32)  # upstream upcasts the sample for the update

    sigma_t, sigma_s0 = sigmas[k + 1], sigmas[k]
    alpha_t = 1 - sigma_t
    lambda_s0 = _half_log_snr(sigma_s0)
    h = _half_log_snr(sigma_t) - lambda_s0
    data_coeff = alpha_t * (torch.exp(-h) - 1.0)
    if len(state.x0_preds) < 1 or k == num_steps - 1:
        x_next = (sigma_t / sigma_s0) * sample - data_coeff * x0
    else:
        r0 = (lambda_s0 - _half_log_snr(sigmas[k - 1])) / h
        d1 = (1.0 / r0) * (x0 - x0_preds[-2])
        x_next = (sigma_t / sigma_s0) * sample - data_coeff * x0 - 0.5 * data_coeff * d1
    return x_next.to(x0.dtype), SolverState(x0_preds=x0_preds)


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, k: int, state: SolverState
) -> tuple[torch.Tensor, SolverState]:
    """One Euler step from ``sigmas[k]`` to ``sigmas[k + 1]``: ``x + (sigma_next - sigma) * v``.

    As the fork's ``EulerScheduler.step``: the sample is upcast to float32 and the sigma difference is
    taken in float32 before it scales the velocity. ``state`` passes through (Euler keeps no history).
    """
    if k >= len(sigmas) - 1:
        # Upstream quirk (duplicated first timestep): the fork indexes past its sigmas here.
        return x, state
    sample = x.to(torch.float32)
    return sample + (sigmas[k + 1] - sigmas[k]) * v, state


SOLVERS: dict[str, StepFunction] = {"unipc": unipc_step, "dpm++": dpmpp_step, "euler": euler_step}


def step(
    solver: str, x: torch.Tensor, v: torch.Tensor, sched: Schedule, i: int, state: SolverState
) -> tuple[torch.Tensor, SolverState]:
    """Advance loop step ``i`` of ``sched`` with ``solver``, given the model's velocity ``v`` at ``x``."""
    if solver != sched.solver:
        raise ValueError(
            f"solver {solver!r} does not match the schedule, which was made for {sched.solver!r}"
        )
    return SOLVERS[solver](x, v, sched.sigmas, sched.sigma_index(i), state)
