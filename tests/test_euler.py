"""The Euler solver of the Lightning fork (`wan/utils/fm_solvers_euler.py`): its float timesteps and
sigmas for any steps/shift, and its step, against values derived from the reference's formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wan.conditioning import Conditioning
from wan.schedule import expert_for, make_schedule
from wan.solvers import euler_step, initial_state, step


def fork_schedule(steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """The reference's formulas, in numpy float32: get_timesteps = linspace(1000, 0, N + 1, float32);
    sigmas = timesteps / 1000; timestep_shift = shift * s / (1 + (shift - 1) * s); timesteps = sigmas * 1000."""
    ticks = np.linspace(1000, 0, steps + 1, dtype=np.float32)
    sigmas = ticks / np.float32(1000)
    sigmas = np.float32(shift) * sigmas / (np.float32(1) + np.float32(shift - 1) * sigmas)
    return sigmas * np.float32(1000), sigmas


def test_lightning_recipe_timesteps_are_the_goldens_floats():
    sched = make_schedule("euler", 4, 5.0)
    # the fork's golden run (tests/golden_e2e_lightning manifest): 1000, 937.5, 833.33, 625 and a final 0
    assert sched.timesteps.dtype == torch.float32 and sched.timesteps.tolist() == [
        1000.0,
        937.5,
        833.3333129882812,
        625.0,
    ]
    assert sched.sigmas.tolist() == [1.0, 0.9375, 0.8333333134651184, 0.625, 0.0]
    assert [sched.timestep(i) for i in range(len(sched))] == [1000.0, 937.5, 833.3333129882812, 625.0]
    assert sched.offset == 0 and len(sched) == 4
    # A14B experts by float comparison, as the fork's t.item() >= boundary: high, high, low, low at 0.875
    assert [expert_for(t, 0.875) for t in sched.timesteps] == ["high", "high", "low", "low"]


@pytest.mark.parametrize("steps", [1, 2, 4, 6, 8, 20, 40, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0, 12.0])
def test_schedule_matches_the_reference_formulas(steps, shift):
    ticks, sigmas = fork_schedule(steps, shift)
    sched = make_schedule("euler", steps, shift)
    np.testing.assert_array_equal(sched.timesteps.numpy(), ticks[:-1])  # the loop's timesteps[:-1]
    np.testing.assert_array_equal(sched.sigmas.numpy(), sigmas)
    assert sched.sigmas[-1] == 0 and sched.sigmas[0] == 1


def test_step_is_the_references_update():
    sched = make_schedule("euler", 4, 5.0)
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 16, 3, 4, 4, generator=gen), torch.randn(2, 16, 3, 4, 4, generator=gen)
    state = initial_state()
    for i in range(len(sched)):
        expected = (
            x + (sched.sigmas[i + 1] - sched.sigmas[i]) * v
        )  # x_t_next = sample + (sigma_next - sigma) * v
        x_next, state = step("euler", x, v, sched, i, state)
        assert torch.equal(x_next, expected) and state == initial_state()
        x = x_next
    # the sample is upcast to float32 first, as the fork's sample.to(torch.float32)
    out, _ = euler_step(x.to(torch.bfloat16), v, sched.sigmas, 0, initial_state())
    assert out.dtype == torch.float32


def test_euler_integrates_a_straight_flow_exactly():
    """x_sigma = (1 - sigma) x0 + sigma noise has constant velocity noise - x0: Euler lands on x0."""
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(1, 4, 2, 3, 3, generator=gen), torch.randn(1, 4, 2, 3, 3, generator=gen)
    sched = make_schedule("euler", 7, 5.0)
    x, state = noise.clone(), initial_state()
    for i in range(len(sched)):
        x, state = step("euler", x, noise - x0, sched, i, state)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)


def test_the_dit_receives_float_timesteps():
    latent = torch.zeros(1, 48, 3, 4, 4)
    t = Conditioning().model_timestep(937.5, latent)
    assert t.dtype == torch.float32 and t.tolist() == [937.5]
    assert Conditioning().model_timestep(937, latent).dtype == torch.int64  # unipc / dpm++: int64 as upstream
    per_token = (
        Conditioning(first_frame=torch.zeros(1, 48, 1, 4, 4))
        .model_timestep(833.3333129882812, latent)
        .dense()
    )
    assert (
        per_token.dtype == torch.float32 and per_token[0, 0] == 0 and per_token[0, -1] == np.float32(833.3333)
    )
