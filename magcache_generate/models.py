"""What holds the models of a run: the experts (loaded, placed and swapped by `wan.experts.ExpertPool`),
the text encoder and the VAE, each loaded on first use and placed as the `RunPlan` decided.

The loads are separate steps (`text_encoder`, `vae`, the experts' `activate`), so a caller may start
one while another runs; the load times are summed in `load_seconds`. As the run's host plan says, the
first expert loads on a background thread while the text encoder works (`start_first_expert`), and
the second while the first denoises (the pool's `background_next`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import wan
from magcache_generate.dit_runtime import ConfiguredModels
from magcache_generate.loras import expert_specs
from magcache_generate.progress import Reporter
from magcache_generate.request import Request
from magcache_generate.run_plan import RequestPlan, RunPlan
from magcache_generate.text_stage import initialise_device, load_text_side
from wan.experts import ExpertPool
from wan.loading import locate_transformer_files, read_layout
from wan.schedule import expert_for


class Models:
    """The models shared by every request of a run, loaded lazily, placed as `plan` says."""

    def __init__(self, plan: RunPlan, first: Request, reporter: Reporter):
        self.plan = plan
        self.reporter = reporter
        self.device_init_s = initialise_device(plan.device)  # the CUDA context, reported on its own
        self.experts = ExpertPool(
            plan.experts,
            dtype=plan.dtype,
            storage=plan.weights,
            device=plan.device,
            offload=plan.offload,
            # a two-expert batch keeps both in host memory only where the host plan found room
            keep_inactive=plan.keep_inactive and (len(plan.experts) < 2 or plan.host.keep_experts),
            background_next=plan.host.second_background,
            on_load=self._start_loading,
            on_shard=lambda shard: reporter.advance(self._loading_task, detail=shard.name),
            loras=expert_specs(first.loras, list(plan.experts)),  # merged as each expert loads
            placement=plan.memory.placement() if plan.memory is not None else None,
            on_warning=lambda message: reporter.log(f"[yellow]warning[/]: {message}"),
            # --dit-fsdp: each rank loads only its part of every expert
            shard=plan.parallel.weight_sharder() if plan.parallel is not None else None,
        )
        self._loading_task = 0
        self._text_encoder = None
        self._tokenizer = None
        self.text_parts: dict[str, float] = {}  # the current item's text stage, in parts
        self.contexts: dict[tuple[str, int], torch.Tensor] = {}  # encoded prompts, reused by a batch
        self._vae = None
        self.load_seconds = 0.0

    def _start_loading(self, expert: str, path: Path) -> None:
        """A progress bar per expert load, advanced shard by shard."""
        files = locate_transformer_files(path)
        shards = len(files.shards)
        layout, _ = read_layout(files)  # headers only; says what a single file holds
        stored = "" if layout.identity else f"; {layout.describe()}"
        self._loading_task = self.reporter.task(f"loading {expert} transformer", total=shards)
        self.reporter.log(f"loading {expert} transformer from {path} ({shards} shard(s){stored})")

    def start_first_expert(self, plan: RequestPlan) -> None:
        """Start loading the expert of the first denoising step in the background, where the host plan
        lets it load while the text encoder works (nothing if it is loaded already)."""
        if self.plan.host.text_overlap:
            self.experts.prefetch(expert_for(plan.schedule.timestep(0), self.plan.task.boundary))

    def dit(self) -> ConfiguredModels:
        """The experts as the sampling loop takes them, with the run's attention kernel and compiler
        (and under torchrun this rank's token shard and weight sharding)."""
        models = self.plan.dit_runtime.models(self.experts)
        return models if self.plan.parallel is None else self.plan.parallel.models(models)

    def text_encoder(self):
        """The umT5 encoder (on the planned device) and its tokenizer."""
        if self._text_encoder is None:
            start = time.perf_counter()
            with self.reporter.stage("loading text encoder"):
                # upstream runs the umT5 encoder in bf16, on CPU too (--t5_cpu)
                self._text_encoder, self._tokenizer = load_text_side(
                    self.plan.files.t5,
                    self.plan.files.tokenizer,
                    device=self.plan.t5_device,
                    parts=self.text_parts,
                )
            self.load_seconds += time.perf_counter() - start
        elif self._text_encoder.device != self.plan.t5_device:  # parked by the previous request
            self._text_encoder.to(self.plan.t5_device)
        return self._text_encoder, self._tokenizer

    def vae(self):
        if self._vae is None:
            start = time.perf_counter()
            with self.reporter.stage("loading VAE"):
                self._vae = wan.load_vae(self.plan.files.vae, device=self.plan.device)
            self.load_seconds += time.perf_counter() - start
        return self._vae

    def park_text_encoder(self, keep: bool) -> None:
        """upstream offload_model: the T5 leaves the accelerator after encoding."""
        if self._text_encoder is None or not self.plan.offload or self.plan.t5_device.type == "cpu":
            return
        if keep:
            self._text_encoder.to("cpu")
        else:
            self._text_encoder = None
        if self.plan.device.type == "cuda":
            torch.cuda.empty_cache()

    def after_denoise(self) -> None:
        """upstream offload_model: the experts leave the accelerator before the decode. With --dit-fsdp
        (no offloading) one video frees its sharded experts there instead: nothing uses them again."""
        if self.plan.offload:
            self.experts.offload_all()
        elif self.plan.frees_dit_before_decode:
            self.experts.release()
