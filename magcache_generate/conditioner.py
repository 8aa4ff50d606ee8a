"""What conditions a sample: the prompt pair encoded by umT5, the initial noise, and the task's image
conditioning (i2v: mask + encoded first frame; ti2v: the encoded first frame), with their stage times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from magcache_generate.metering import StageMeter
from magcache_generate.models import Models
from magcache_generate.progress import Reporter
from magcache_generate.render import SamplingInputs
from magcache_generate.run_plan import RequestPlan, RunPlan
from magcache_generate.startup import StartupClock
from magcache_generate.text_stage import encode_timed
from magcache_generate.video_io import read_image
from wan.conditioning import Conditioning, i2v_mask, i2v_video
from wan.configs import SIZES, max_area
from wan.image_prep import i2v_first_frame, ti2v_first_frame


@dataclass(frozen=True)
class Conditioned:
    """A sample's starting point and what it took to make."""

    inputs: SamplingInputs
    size_wh: tuple[int, int]  # the output video's (width, height)
    timings: dict[str, float]  # encode_text[, encode_image]
    text_parts: dict[str, float]  # the text stage in parts (imports, tokenizer, t5_read, encode, other)


class Conditioner:
    """Encodes text and images with the run's models, placed as the run plan says."""

    def __init__(self, run: RunPlan, models: Models):
        self.run, self.models = run, models

    def condition(
        self,
        plan: RequestPlan,
        meter: StageMeter,
        reporter: Reporter,
        *,
        keep_encoder: bool,
        startup: StartupClock | None = None,
    ) -> Conditioned:
        """Text, then noise and image conditioning (drawn from the request's seed), metered per stage.
        `keep_encoder`: park the text encoder on the host for the next request instead of dropping it.
        `startup`: the process's clock, given the text stage's marks and parts."""
        request = plan.request
        generator = torch.Generator(device=self.run.device).manual_seed(request.base_seed)
        if startup is not None:
            startup.device_init_s = self.models.device_init_s
            startup.mark("text_start")
        self.models.start_first_expert(plan)  # reads while the text encoder reads and encodes
        self.models.text_parts = {}
        with meter.stage("encode_text"):
            with reporter.stage("encoding text"):
                context, context_null = self.text(request.prompt, plan.negative_prompt)
            self.models.park_text_encoder(keep=keep_encoder)
        timings = {"encode_text": meter.seconds["encode_text"]}
        text_parts = dict(self.models.text_parts)
        text_parts["other"] = max(0.0, timings["encode_text"] - sum(text_parts.values()))  # moves, parking
        if startup is not None:
            startup.mark("text_done")
            startup.text_stage(text_parts)
        with meter.stage("encode_image"):
            noise, conditioning, size_wh = self.latents(plan, generator)
        if request.image is not None:
            timings["encode_image"] = meter.seconds["encode_image"]
        else:
            meter.gpu.pop("encode_image", None)  # only noise was drawn
        inputs = SamplingInputs(noise, plan.schedule, context, context_null, conditioning)
        return Conditioned(inputs, size_wh, timings, text_parts)

    def text(self, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's and the negative prompt's umT5 context, [1, L, C] each, on the run's device.
        With --t5-fsdp under torchrun the replica's writer encodes (the other ranks never load the
        encoder) and broadcasts the context to its replica."""
        parallel = self.run.parallel
        if parallel is None or not parallel.options.t5_fsdp:
            return self.encode(prompt, negative)

        def encode() -> tuple[torch.Tensor, ...]:
            return tuple(c.cpu() for c in self.encode(prompt, negative))

        context, context_null = parallel.share_in_replica(encode)
        return context.to(self.run.device), context_null.to(self.run.device)

    def encode(self, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
        encoder, tokenizer = self.models.text_encoder()
        text_len = self.run.dit_config.text_len
        # two separate batch-1 calls, as upstream; each runs on its prompt's real tokens only
        parts, known = self.models.text_parts, self.models.contexts
        context = encode_timed(encoder, tokenizer, [prompt], text_len, parts, known)[0]
        context_null = encode_timed(encoder, tokenizer, [negative], text_len, parts, known)[0]
        return context[None].to(self.run.device), context_null[None].to(self.run.device)

    def latents(
        self, plan: RequestPlan, generator: torch.Generator
    ) -> tuple[torch.Tensor, Conditioning, tuple[int, int]]:
        """Initial noise [1, C, T, H, W], the task's conditioning and the output (width, height)."""
        request, task, device = plan.request, self.run.task, self.run.device
        t_lat = (request.frame_num - 1) // task.vae_stride[0] + 1
        stride = task.vae_stride[1]

        def noise(channels: int, height: int, width: int) -> torch.Tensor:
            shape = (channels, t_lat, height // stride, width // stride)
            return torch.randn(shape, dtype=torch.float32, generator=generator, device=device)[None]

        z_dim = self.run.dit_config.out_dim
        if request.image is None:
            width, height = SIZES[request.size]
            return noise(z_dim, height, width), Conditioning(), (width, height)
        image = read_image(request.image)
        vae = self.models.vae()
        if task.name == "i2v-A14B":
            frame = i2v_first_frame(image, max_area(request.size), stride)
            h, w = frame.shape[1:]
            drawn = noise(16, h, w)
            z = vae.encode(i2v_video(frame, request.frame_num)[None])  # the clip stays on the host
            y = torch.cat([i2v_mask(request.frame_num, z.shape[3], z.shape[4]).to(device)[None], z], dim=1)
            return drawn, Conditioning(y=y), (w, h)
        frame = ti2v_first_frame(image, max_area(request.size), multiple=stride * 2)
        h, w = frame.shape[1:]
        drawn = noise(z_dim, h, w)
        z = vae.encode(frame[None, :, None].to(device))
        return drawn, Conditioning(first_frame=z), (w, h)
