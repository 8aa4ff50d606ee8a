"""Schedules and solvers: golden parity with the official schedulers, plus exact-answer unit tests."""

from __future__ import annotations

import pytest
import torch
from goldens import entry, golden_params, tensors

from wan.schedule import (
    UNIPC_SIGMA_MAX,
    Schedule,
    UnknownSolverError,
    dpmpp_sigmas,
    expert_for,
    high_noise_steps,
    make_schedule,
    shift_sigmas,
)
from wan.solvers import SOLVERS, SolverState, dpmpp_step, initial_state, step

# Golden tensors are float32 and made on another CPU, whose log/exp differ from ours in the last ulp;
# over 100 steps that stays ~4e-7 of the tensor scale.
REL_TOL = 1e-5

# wan22-runtime.md section 7: the official UniPC timesteps for the three task defaults.
T2V_40_12 = [
    999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947, 941, 936, 929,
    922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717, 678, 631, 571, 492, 386, 235,
]  # fmt: skip
I2V_40_5 = [
    999, 994, 989, 983, 978, 972, 965, 959, 952, 944, 937, 929, 920, 911, 902, 892, 882, 870, 859, 846,
    833, 818, 803, 786, 768, 749, 728, 706, 681, 654, 624, 591, 555, 514, 468, 416, 356, 288, 208, 113,
]  # fmt: skip
TI2V_50_5 = [
    999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906, 898, 890,
    882, 873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681, 660, 636, 611, 584,
    555, 522, 487, 448, 405, 356, 302, 241, 172, 92,
]  # fmt: skip

AFFINE_FORMULA = "A*x + B*(t.to(float32)/1000) + C, float32"
GOLDEN_SOLVER_KEYS = {"unipc": "unipc", "dpmpp": "dpm++"}


def max_rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the scale (max |expected|, at least 1) of the reference."""
    scale = max(1.0, expected.abs().max().item())
    return (actual - expected).abs().max().item() / scale


# ---------------------------------------------------------------------------------------------------------
# golden parity


@pytest.mark.parametrize("name", golden_params("sched_timesteps"))
def test_schedule_matches_official_grids(name: str) -> None:
    stored = tensors(name)
    tags = sorted({key.split(".")[1] for key in stored if key.startswith("unipc.")})
    assert len(tags) == len(entry(name)["args"]["pairs"])
    for tag in tags:
        steps_text, shift_text = tag.split("_")
        steps, shift = int(steps_text), float(shift_text)
        for golden_key, solver in GOLDEN_SOLVER_KEYS.items():
            sched = make_schedule(solver, steps, shift)
            assert torch.equal(sched.timesteps, stored[f"{golden_key}.{tag}.timesteps"]), (solver, tag)
            assert torch.equal(sched.sigmas, stored[f"{golden_key}.{tag}.sigmas"]), (solver, tag)
        sampling_sigmas = stored.get(f"dpmpp.{tag}.sampling_sigmas")
        if sampling_sigmas is not None:
            assert torch.equal(dpmpp_sigmas(steps, shift), sampling_sigmas), tag


@pytest.mark.parametrize("name", golden_params("sched_integrate"))
def test_solver_trajectory_matches_official(name: str) -> None:
    info, stored = entry(name), tensors(name)
    args = info["args"]
    sched = make_schedule(args["solver"], args["steps"], args["shift"])
    assert torch.equal(sched.timesteps, stored["sched.timesteps"])
    assert torch.equal(sched.sigmas, stored["sched.sigmas"])

    completed = info["completed_steps"]
    samples, model_outputs = stored["step.sample"], stored["step.model_output"]
    # The official scheduler's step index before each call: -1 (unset) on the first call, then ours.
    index_before = stored["step.step_index_before"].tolist()
    assert index_before[1:] == [sched.sigma_index(i) for i in range(1, completed)]
    # Every step the official code completed is one of ours; the step it crashed on (if any) is dropped.
    assert len(sched) == completed

    # Replay the stored model outputs: checks the solver arithmetic alone.
    x, state = stored["input.noise"], initial_state()
    for i in range(completed):
        x, state = step(args["solver"], x, model_outputs[i], sched, i, state)
        assert max_rel_diff(x, samples[i + 1]) < REL_TOL, f"step {i}"

    # Drive the fake model the golden describes: also checks which timestep the model is given.
    if args.get("model_output_formula") != AFFINE_FORMULA:
        pytest.skip(f"unknown model_output_formula {args.get('model_output_formula')!r}")
    a, b, c = stored["input.A"], stored["input.B"], stored["input.C"]
    x, state = stored["input.noise"], initial_state()
    for i in range(len(sched)):
        v = a * x + b * (sched.timesteps[i].to(torch.float32) / 1000) + c
        assert max_rel_diff(v, model_outputs[i]) < REL_TOL, f"model output {i}"
        x, state = step(args["solver"], x, v, sched, i, state)
        assert max_rel_diff(x, samples[i + 1]) < REL_TOL, f"step {i}"
    assert torch.isfinite(x).all()


# ---------------------------------------------------------------------------------------------------------
# schedule


def test_shift_fixes_endpoints_and_is_monotone() -> None:
    sigma = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (1.0, 3.0, 5.0, 12.0):
        shifted = shift_sigmas(sigma, shift)
        assert shifted[0] == 0 and shifted[-1] == 1
        assert (shifted.diff() > 0).all()
        assert (shifted >= sigma - 1e-15).all()  # a shift > 1 spends more steps at high noise
    assert torch.equal(shift_sigmas(sigma, 1.0), sigma)


@pytest.mark.parametrize(
    ("steps", "shift", "expected"), [(40, 12.0, T2V_40_12), (40, 5.0, I2V_40_5), (50, 5.0, TI2V_50_5)]
)
def test_task_default_timesteps(steps: int, shift: float, expected: list[int]) -> None:
    sched = make_schedule("unipc", steps, shift)
    assert sched.timesteps.dtype == torch.int64
    assert sched.timesteps.tolist() == expected
    assert sched.sigmas.dtype == torch.float32 and sched.sigmas.shape == (steps + 1,)
    assert sched.sigmas[-1] == 0 and sched.offset == 0 and len(sched) == steps


def test_unipc_and_dpmpp_grid_tops() -> None:
    assert UNIPC_SIGMA_MAX == 0.9990000128746033
    t2v = make_schedule("unipc", 40, 12.0)
    assert t2v.sigmas[0].item() == pytest.approx(0.999917, abs=1e-6)
    assert t2v.sigmas[-2].item() == pytest.approx(0.235110, abs=1e-6)
    dpmpp = make_schedule("dpm++", 40, 12.0)
    assert dpmpp.sigmas[0] == 1.0 and dpmpp.timesteps[0] == 1000


def test_duplicated_first_timestep_sets_offset() -> None:
    unipc = make_schedule("unipc", 100, 12.0)
    assert unipc.timesteps[:2].tolist() == [999, 999]
    assert unipc.offset == 1 and len(unipc) == 99 and unipc.sigma_index(0) == 1
    assert make_schedule("dpm++", 100, 12.0).offset == 0


def test_bad_solver_and_steps_are_readable_errors() -> None:
    with pytest.raises(UnknownSolverError, match=r"'heun'.*unipc, dpm\+\+, euler"):
        make_schedule("heun", 10, 5.0)
    with pytest.raises(ValueError, match="at least 1"):
        make_schedule("unipc", 0, 5.0)
    with pytest.raises(ValueError, match="does not match"):
        step("dpm++", torch.zeros(2), torch.zeros(2), make_schedule("unipc", 4, 5.0), 0, initial_state())


def test_expert_boundary_is_inclusive() -> None:
    assert expert_for(875, 0.875) == "high" and expert_for(874, 0.875) == "low"
    assert expert_for(900, 0.9) == "high" and expert_for(899, 0.9) == "low"
    assert expert_for(torch.tensor(900), 0.9) == "high"
    assert expert_for(999, None) == "single"


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
@pytest.mark.parametrize(("steps", "shift", "boundary", "high"), [(40, 12.0, 0.875, 26), (40, 5.0, 0.9, 15)])
def test_high_low_expert_split(solver: str, steps: int, shift: float, boundary: float, high: int) -> None:
    sched = make_schedule(solver, steps, shift)
    assert high_noise_steps(sched.timesteps, boundary) == high
    assert sum(expert_for(t, boundary) == "low" for t in sched.timesteps) == steps - high
    assert high_noise_steps(sched.timesteps, None) == 0


# ---------------------------------------------------------------------------------------------------------
# solvers


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize(("steps", "shift"), [(1, 5.0), (2, 3.0), (8, 3.0), (40, 12.0), (100, 12.0)])
def test_straight_flow_is_integrated_exactly(solver: str, steps: int, shift: float) -> None:
    # On the straight path x = (1 - sigma) x0 + sigma n the velocity is (x - x0) / sigma, so the data
    # prediction is x0 at every step and every solver must stay on the path and end at x0.
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 5, generator=gen)
    sched = make_schedule(solver, steps, shift)
    sigma_start = sched.sigmas[sched.sigma_index(0)]
    x, state = (1 - sigma_start) * x0 + sigma_start * noise, initial_state()
    for i in range(len(sched)):
        k = sched.sigma_index(i)
        v = (x - x0) / sched.sigmas[k]
        x, state = step(solver, x, v, sched, i, state)
        sigma_next = sched.sigmas[k + 1]
        torch.testing.assert_close(x, (1 - sigma_next) * x0 + sigma_next * noise, rtol=0, atol=2e-5)
    torch.testing.assert_close(x, x0, rtol=0, atol=2e-5)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_step_past_the_end_is_a_no_op(solver: str) -> None:
    # The step the official code crashes on (duplicated first timestep) leaves the finished latent as is.
    sched = make_schedule(solver, 6, 5.0)
    sched = Schedule(solver, sched.timesteps, sched.sigmas, offset=1)
    x, state = torch.randn(2, 3), SolverState(x0_preds=(torch.zeros(2, 3),))
    x_next, state_next = step(solver, x, torch.randn(2, 3), sched, len(sched), state)
    assert x_next is x and state_next is state


def test_dpmpp_first_steps_from_sigma_one_have_no_nans() -> None:
    gen = torch.Generator().manual_seed(1)
    sched = make_schedule("dpm++", 8, 3.0)
    assert sched.sigmas[0] == 1.0
    x, v1, v2 = (torch.randn(4, 6, generator=gen) for _ in range(3))
    x1, state = dpmpp_step(x, v1, sched.sigmas, 0, initial_state())
    sigma_1 = sched.sigmas[1]
    # alpha = 0, lambda = -inf at sigma 1: the first step is sigma_t * x + alpha_t * x0.
    torch.testing.assert_close(x1, sigma_1 * x + (1 - sigma_1) * (x - v1), rtol=1e-6, atol=1e-6)
    x2, _ = dpmpp_step(x1, v2, sched.sigmas, 1, state)
    assert torch.isfinite(x2).all()
    # r0 = inf there, so the second-order correction vanishes: equal to the first-order update.
    first_order, _ = dpmpp_step(x1, v2, sched.sigmas, 1, initial_state())
    torch.testing.assert_close(x2, first_order, rtol=0, atol=0)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_last_step_returns_the_data_prediction(solver: str) -> None:
    gen = torch.Generator().manual_seed(2)
    sched = make_schedule(solver, 4, 5.0)
    x, state = torch.randn(5, generator=gen), initial_state()
    for i in range(len(sched)):
        v = torch.randn(5, generator=gen)
        before = x
        x, state = step(solver, x, v, sched, i, state)
    torch.testing.assert_close(
        x, before - sched.sigmas[sched.sigma_index(len(sched) - 1)] * v, rtol=0, atol=0
    )


def test_state_is_not_mutated() -> None:
    sched = make_schedule("unipc", 5, 5.0)
    x, v = torch.randn(3), torch.randn(3)
    state0 = initial_state()
    x1, state1 = step("unipc", x, v, sched, 0, state0)
    assert state0 == SolverState() and len(state1.x0_preds) == 1 and state1.last_order == 1
    x2a, _ = step("unipc", x1, v, sched, 1, state1)
    x2b, _ = step("unipc", x1, v, sched, 1, state1)
    assert torch.equal(x2a, x2b) and len(state1.x0_preds) == 1
