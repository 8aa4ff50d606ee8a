"""`--distilled RECIPE`: the sampling settings a step-distilled model was trained for.

`lightning` is Wan2.2-Lightning (lightx2v), as its fork of the official code configures it
(`wan/configs/wan_t2v_A14B.py`, `wan_i2v_A14B.py`, `wan_ti2v_5B.py`): 4 steps, shift 5, guide
scale 1 for both experts (no unconditional forward) and the Euler solver. The recipe only fills the
settings the user did not give. The fork's `--lora_dir` implies it (the fork's own defaults), unless
`--distilled none`. Torch-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from magcache_generate.request import UserError

if TYPE_CHECKING:
    from magcache_generate.validate import GenerateOptions


@dataclass(frozen=True)
class DistilledRecipe:
    name: str
    sample_steps: int
    sample_shift: float
    sample_guide_scale: float  # one value: every expert
    sample_solver: str


RECIPES = {"lightning": DistilledRecipe("lightning", 4, 5.0, 1.0, "euler")}
NONE = "none"
CHOICES = (*RECIPES, NONE)


def recipe_name(options: GenerateOptions) -> str | None:
    """The recipe in effect: `--distilled`, else `lightning` when `--lora-dir` is given; None for none."""
    name = options.distilled
    if name is None and options.lora_dir:
        name = "lightning"  # the Lightning fork's --lora_dir comes with the fork's 4-step defaults
    if name is not None and name not in CHOICES:
        raise UserError(f"unknown --distilled {name!r}; use one of {', '.join(CHOICES)}")
    return None if name in (None, NONE) else name


def apply_distilled(options: GenerateOptions) -> GenerateOptions:
    """Fill the sampling settings the user left unset with the recipe's (idempotent)."""
    name = recipe_name(options)
    if name is None:
        return options
    recipe = RECIPES[name]
    fields = ("sample_steps", "sample_shift", "sample_guide_scale", "sample_solver")
    filled = {f: getattr(recipe, f) for f in fields if getattr(options, f) is None}
    return dataclasses.replace(options, **filled)
