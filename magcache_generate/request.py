"""What one generation asks for: frozen, fully resolved (task defaults applied) and validated records.

The CLI builds these; `magcache_generate.run` executes them. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from magcache_generate.naming import dense_reference_path, sidecar_path

if TYPE_CHECKING:
    from magcache_generate.weight_paths import WeightPaths


class UserError(ValueError):
    """A bad input: the message is one line naming the input and how to fix it (exit code 2)."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory; the message says which flags lower the peak."""


@dataclass(frozen=True)
class MagCacheOptions:
    enabled: bool = False
    mode: str = "aligned"  # "aligned" (default, defects fixed) | "official" (upstream script exactly)
    thresh: float | None = None  # None: the task preset
    K: int | None = None
    retention_ratio: float | None = None
    ratios_file: Path | None = None
    calibrate_file: Path | None = None  # dense run that records ratios into this JSON file
    speedup: float | None = None  # pick the smallest threshold reaching this ideal speedup
    verify: bool = False  # also run dense (same seed): measured speedup and quality vs the dense video


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA file of the command line, resolved: which expert(s) it goes into and at what scale."""

    path: Path
    scale: float = 1.0
    expert: str = "all"  # "all" (every expert), "high" or "low" (A14B only)
    flag: str = "--lora"  # the option that named it, for messages

    def applies_to(self, expert: str) -> bool:
        return self.expert in ("all", expert)


@dataclass(frozen=True)
class Request:
    task: str
    ckpt_dir: Path
    prompt: str
    size: str
    frame_num: int
    sample_solver: str
    sample_steps: int
    sample_shift: float
    guide_scale: tuple[float, float]  # (low-noise, high-noise), upstream order
    base_seed: int
    save_file: Path
    negative_prompt: str | None = None  # None: the official Chinese negative prompt
    image: Path | None = None
    offload_model: bool = True
    convert_model_dtype: bool = False
    quantize: str | None = None  # "fp8": the DiT block Linears' weights stored in float8 (`wan.fp8`)
    fp8_matmul: str = "auto"  # whether those multiply in fp8 (`torch._scaled_mm`): auto | on | off
    t5_cpu: bool = False
    device: str = "auto"  # "auto" -> cuda if available else cpu
    save_frames: Path | None = None
    overwrite: bool = False
    crf: int = 10
    sidecar: bool = True
    vae_tiled: bool = False
    attention: str = "auto"  # attention kernel (wan.attention_backends.BACKENDS)
    compile: str = "auto"  # --compile: torch.compile the DiT block (auto | on | off)
    gpu_memory: float | None = None  # --gpu-memory in GiB; None: auto (free device memory minus a margin)
    cfg_batch: str = "auto"  # --cfg-batch: CFG steps as one batch-2 forward (auto | on | off)
    magcache: MagCacheOptions = field(default_factory=MagCacheOptions)
    loras: tuple[LoraChoice, ...] = ()  # merged into the experts' weights at load time
    distilled: str | None = None  # the step-distillation recipe whose defaults were applied ("lightning")
    weights: WeightPaths | None = None  # each part's file; None: the official layout under ckpt_dir

    @property
    def weight_paths(self) -> WeightPaths:
        from magcache_generate.weight_paths import WeightPaths
        from wan.configs import TASKS

        return (
            self.weights
            if self.weights is not None
            else WeightPaths.official(self.ckpt_dir, TASKS[self.task])
        )

    @property
    def sidecar_file(self) -> Path:
        return sidecar_path(self.save_file)

    @property
    def dense_save_file(self) -> Path | None:
        """The dense reference video of ``--magcache-verify`` (None without it)."""
        return dense_reference_path(self.save_file) if self.magcache.verify else None
