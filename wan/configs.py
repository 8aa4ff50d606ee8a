"""Task configurations of the official Wan 2.2 runtime (wan/configs/*.py upstream), as frozen data.

Architecture widths are NOT here: they come from each checkpoint's config.json, as upstream.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Upstream shared_config.sample_neg_prompt, byte-exact (full-width commas; ftfy later turns them into ',').
NEGATIVE_PROMPT = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"

# SIZE_CONFIGS: '--size W*H' -> (W, H); the area is MAX_AREA_CONFIGS (the pixel budget of the image tasks).
SIZES: dict[str, tuple[int, int]] = {
    "720*1280": (720, 1280),
    "1280*720": (1280, 720),
    "480*832": (480, 832),
    "832*480": (832, 480),
    "704*1280": (704, 1280),
    "1280*704": (1280, 704),
    "1024*704": (1024, 704),
    "704*1024": (704, 1024),
}


def max_area(size: str) -> int:
    w, h = SIZES[size]
    return w * h


@dataclass(frozen=True)
class TaskConfig:
    name: str
    model_type: str  # "t2v" | "i2v" | "ti2v": the DiT config.json model_type
    sample_shift: float
    sample_steps: int
    guide_scale: tuple[float, float]  # (low-noise expert, high-noise expert), upstream order
    boundary: float | None  # t >= boundary * 1000 runs the high-noise expert; None = one model
    frame_num: int
    fps: int
    vae_kind: str  # "2.1" | "2.2"
    vae_stride: tuple[int, int, int]  # (time, height, width)
    vae_checkpoint: str
    supported_sizes: tuple[str, ...]
    image: str  # "required" | "optional" | "refused"
    default_size: str
    t5_checkpoint: str = "models_t5_umt5-xxl-enc-bf16.pth"
    t5_tokenizer: str = "google/umt5-xxl"
    text_len: int = 512
    num_train_timesteps: int = 1000
    negative_prompt: str = NEGATIVE_PROMPT
    high_noise_checkpoint: str | None = "high_noise_model"
    low_noise_checkpoint: str | None = "low_noise_model"

    @property
    def two_experts(self) -> bool:
        return self.boundary is not None

    @property
    def dit_folders(self) -> tuple[str, ...]:
        """Sub-folders holding DiT weights ('' = checkpoint root)."""
        if self.two_experts:
            return (self.high_noise_checkpoint, self.low_noise_checkpoint)
        return ("",)


T2V_A14B = TaskConfig(
    name="t2v-A14B",
    model_type="t2v",
    sample_shift=12.0,
    sample_steps=40,
    guide_scale=(3.0, 4.0),
    boundary=0.875,
    frame_num=81,
    fps=16,
    vae_kind="2.1",
    vae_stride=(4, 8, 8),
    vae_checkpoint="Wan2.1_VAE.pth",
    supported_sizes=("720*1280", "1280*720", "480*832", "832*480"),
    image="refused",
    default_size="1280*720",
)

I2V_A14B = dataclasses.replace(
    T2V_A14B,
    name="i2v-A14B",
    model_type="i2v",
    sample_shift=5.0,
    guide_scale=(3.5, 3.5),
    boundary=0.900,
    image="required",
)

TI2V_5B = dataclasses.replace(
    T2V_A14B,
    name="ti2v-5B",
    model_type="ti2v",
    sample_shift=5.0,
    sample_steps=50,
    guide_scale=(5.0, 5.0),
    boundary=None,
    frame_num=121,
    fps=24,
    vae_kind="2.2",
    vae_stride=(4, 16, 16),
    vae_checkpoint="Wan2.2_VAE.pth",
    supported_sizes=("704*1280", "1280*704"),
    image="optional",
    default_size="1280*704",
    high_noise_checkpoint=None,
    low_noise_checkpoint=None,
)

TASKS: dict[str, TaskConfig] = {c.name: c for c in (T2V_A14B, I2V_A14B, TI2V_5B)}
