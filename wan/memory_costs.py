"""What a generation costs in GPU memory, stage by stage, as formulas on shapes: the inputs the planner
sees (`MemoryRequest`), the cost models with their coefficients (`ActivationModel`, `VaeMemoryModel`,
`Overheads`: the one place to recalibrate, each documented with where its numbers come from) and the
per-stage estimates. Pure arithmetic: no torch, no I/O. Bytes throughout; GiB only when printed.

Estimates are of peak RESERVED memory (what the CUDA caching allocator holds): the peak of live
tensors (allocated) times a per-stage fragmentation factor, plus fixed costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from wan.configs import TaskConfig

GIB = 2**30


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


class TransformerShape(Protocol):
    """What the planner reads from a DiT config (`wan.modules.transformer.TransformerConfig` fits)."""

    dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    in_dim: int
    out_dim: int
    text_dim: int
    text_len: int
    freq_dim: int
    patch_size: tuple[int, int, int]


def block_params(dim: int, ffn_dim: int) -> int:
    """Parameters of one DiT block: two attentions (q, k, v, o with biases, q/k RMS norms),
    the affine norm3, the 6-row modulation and the two FFN Linears."""
    attention = 4 * (dim * dim + dim) + 2 * dim
    return 2 * attention + 2 * dim + 6 * dim + (dim * ffn_dim + ffn_dim) + (ffn_dim * dim + dim)


def block_linear_params(dim: int, ffn_dim: int) -> int:
    """The part of `block_params` the forward reads only through bf16 autocast (the q, k, v, o and
    FFN Linears with their biases; `wan.weight_storage` stores these in bf16 under autocast)."""
    return 2 * 4 * (dim * dim + dim) + (dim * ffn_dim + ffn_dim) + (ffn_dim * dim + dim)


def block_linear_weight_params(dim: int, ffn_dim: int) -> int:
    """The weights (no biases) of the block Linears: what `--quantize fp8` stores in one byte each."""
    return 8 * dim * dim + 2 * dim * ffn_dim


BLOCK_LINEARS = 10  # q, k, v, o of both attentions and the two FFN Linears: one float32 scale each (fp8)


def nonblock_linear_params(cfg: TransformerShape) -> int:
    """The part of `nonblock_params` read only through bf16 autocast: patch and text embeddings."""
    d, patch = cfg.dim, math.prod(cfg.patch_size)
    return cfg.in_dim * patch * d + d + cfg.text_dim * d + d + d * d + d


def float32_read_params(cfg: TransformerShape) -> int:
    """The part of `nonblock_params` read in float32 (time MLPs, head Linear): stored widened to
    float32 whatever the run dtype (`wan.weight_storage.FLOAT32_READ`)."""
    d, patch = cfg.dim, math.prod(cfg.patch_size)
    return (
        cfg.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d + d * patch * cfg.out_dim + patch * cfg.out_dim
    )


def nonblock_params(cfg: TransformerShape) -> int:
    """Embeddings, time MLPs and head: the part that always stays resident."""
    d, patch = cfg.dim, math.prod(cfg.patch_size)
    patch_embedding = cfg.in_dim * patch * d + d
    text = cfg.text_dim * d + d + d * d + d
    time = cfg.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d
    head = 2 * d + d * patch * cfg.out_dim + patch * cfg.out_dim
    return patch_embedding + text + time + head


@dataclass(frozen=True)
class MemoryRequest:
    """One generation as the planner sees it. `budget` is in bytes."""

    task: TaskConfig
    dit: TransformerShape
    width: int
    height: int
    frames: int
    budget: int
    weight_bytes: int = 2  # bytes per DiT parameter: 2 (bf16, --convert-model-dtype) or 4 (float32)
    # (all of them, except the autocast Linears when autocast_linear_bytes is set; see below)
    offload: bool = True  # --offload-model: one expert (and no T5) on the device at a time
    t5_cpu: bool = False  # the user asked for the text encoder on the CPU
    vae_tiled: bool = False  # the user asked for a tiled decode
    residual_cache: bool = False  # MagCache (or its calibration) keeps block-stack residuals
    image: bool = False  # an input image is VAE-encoded before denoising (i2v: a whole clip)
    vae_during_denoise: bool = False  # the VAE is already on the device while denoising (image, batch)
    t5_bytes: int = 0  # umT5 weights (the file's size); 0: the official 11.4 GB
    vae_bytes: int = 0  # VAE weights; 0: the official float32 size of the task's VAE
    cfg_batch: bool = False  # CFG steps run cond and uncond as one batch-2 forward (twice the activations)
    # bytes per parameter of the Linears read only through bf16 autocast (`wan.weight_storage`): 2 when
    # they are stored bf16 (the float32 regime on CUDA), None: weight_bytes like every other parameter
    autocast_linear_bytes: int | None = None
    fp8_linears: bool = False  # --quantize fp8: block Linear weights 1 byte each (+ a float32 scale)
    fp8_row_scales: bool = False  # fp8 files with per-row scales: one float32 per output row
    # Under torchrun, one rank's part: Ulysses runs 1/N of the tokens on each rank (padded up), and
    # --dit-fsdp keeps 1/N of every block's weights on each rank (a block is gathered whole to run)
    sequence_shards: int = 1
    weight_shards: int = 1
    dit_freed_before_decode: bool = False  # the experts leave the device before the VAE decode

    @property
    def linear_bytes(self) -> int:
        """Bytes per parameter of the autocast-consumed Linears as stored."""
        return self.weight_bytes if self.autocast_linear_bytes is None else self.autocast_linear_bytes

    @property
    def tokens(self) -> int:
        st, ss = self.task.vae_stride[0], self.task.vae_stride[1]
        _, ph, pw = self.dit.patch_size
        return ((self.frames - 1) // st + 1) * (self.height // ss // ph) * (self.width // ss // pw)

    @property
    def rank_tokens(self) -> int:
        """The tokens of this rank's forward: all of them, or its Ulysses shard (padded up)."""
        return -(-self.tokens // self.sequence_shards)

    @property
    def per_token_timesteps(self) -> bool:
        """ti2v-5B with an image: frame-0 tokens run at timestep 0, so modulation rows are per token."""
        return self.image and self.task.image == "optional"

    @property
    def forward_batch(self) -> int:
        """Samples in one DiT forward: 2 when CFG runs as one batched forward, else 1."""
        return 2 if self.cfg_batch else 1

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) of the latent video."""
        st, ss = self.task.vae_stride[0], self.task.vae_stride[1]
        return (self.dit.out_dim, (self.frames - 1) // st + 1, self.height // ss, self.width // ss)

    @property
    def experts_on_device(self) -> int:
        return 2 if self.task.two_experts and not self.offload else 1


# ----------------------------------------------------------------------------------------------------
# The models and their coefficients (the one place to recalibrate)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationModel:
    """Live activation bytes of one DiT forward, per token, in multiples of the model width `dim`
    (and of `ffn_dim` for the FFN hidden state):

        unchunked: L*(dim*stream + ffn_dim*ffn_hidden) + fixed
        chunked:   L*dim*stream + max(L*dim*attention, C*(ffn_dim*ffn_hidden + dim*modulation)) + fixed
        + dim*token_modulation with per-token timesteps (ti2v-5B with an image)
        + L*dim*4*residual_slots (MagCache residuals, float32)

    with L the tokens of one forward and C = min(chunk, L) the tokens per chunk of the token-local
    stages (norms, modulation, projections, FFN). A batched CFG forward (`cfg_batch`) holds both
    branches' tokens: L and C count 2x the tokens of one video (and the per-token modulation pass
    doubles too); the MagCache residuals do not (one slot per branch either way).

    Calibration: `benchmarks/activation_peak.py` (live tensor bytes of a 4-block forward at real widths
    on the meta device, bf16 weights; validated against the earlier H100 run, which it reproduces for
    the code before the activation diet: 6.30 vs 6.3-6.6 GiB at A14B 480p). Measured now (GiB,
    unchunked / chunk 4096 / chunk 16384): A14B 832x480x81 2.751 / 2.234 / 2.766, A14B 1280x720x81
    6.336 / 5.131 / 5.248, ti2v-5B 1280x704x121 1.705 / 1.164 / 1.398 (1.211 at 4096 with an image).
    These coefficients give 2.82 / 2.37 / 2.87, 6.48 / 5.43 / 5.43 and 1.73 / 1.19 / 1.72 (1.24 at
    4096 with an image): never below the measurement, at most +23% above it (ti2v at large chunks). The fp32 residual stream, the
    block input the loop holds, the float32 RoPE table and the attention inputs and output make up
    the `stream` part; the FFN hidden state (bf16) is the peak of an unchunked block.
    """

    stream: float = 12.5  # bytes per token per dim alive through every block
    attention: float = 2.5  # the extra of the self-attention stage over the stream (q, k, v, output)
    ffn_hidden: float = 2.0  # per FFN-width element: the bf16 hidden state (GELU runs in place)
    modulation: float = 6.0  # per chunk token: the float32 normed and modulated chunk input
    token_modulation: float = 4096 * 4.0  # per-token timesteps: one 4096-token pass's gathered float32 rows
    fixed: int = 24 * 2**20  # RoPE rows, timestep embeddings, the head's input, small temporaries
    residual_slots: int = 2  # MagCache residuals held at once (one per CFG branch), fp32
    # Ulysses: q, k, v and the attention output exist on both sides of their all-to-alls for a moment
    # (bf16); read off the code, not calibrated
    exchange: float = 8.0

    def forward_bytes(self, req: MemoryRequest, chunk: int | None) -> int:
        tokens, dim, ffn, batch = req.rank_tokens, req.dit.dim, req.dit.ffn_dim, req.forward_batch
        rows = batch * tokens  # tokens of all samples in the forward (this rank's shard under Ulysses)
        total = rows * dim * self.stream + self.fixed
        if req.sequence_shards > 1:
            total += rows * dim * self.exchange
        if chunk is None or chunk >= tokens:
            total += rows * ffn * self.ffn_hidden
        else:
            per_token = ffn * self.ffn_hidden + dim * self.modulation
            total += max(rows * dim * self.attention, batch * chunk * per_token)
        if req.per_token_timesteps:
            total += batch * dim * self.token_modulation
        if req.residual_cache:
            total += tokens * dim * 4 * self.residual_slots
        if req.fp8_linears:  # the dequantised copies of the two largest weights in flight
            total += 2 * dim * ffn * (2 if req.autocast_linear_bytes else req.weight_bytes)
        elif req.linear_bytes == 4:  # bf16 autocast copies of the two largest weights in flight
            total += 2 * 2 * dim * ffn  # (none when the Linears are stored in bf16)
        return int(total)


@dataclass(frozen=True)
class VaeMemoryModel:
    """Live bytes of a VAE decode (float32) from shapes: T frames of H x W pixels out, t latent frames
    of h x w cells in, tiles of th x tw pixels:

        untiled: 12*T*H*W (the output video) + per_pixel*H*W (the working set of one latent frame's
                 chunk at full resolution, with every causal conv's 2-frame cache; independent of T)
        tiled:   max(stem, body) where
                 stem = features + stem_per_cell*h*w + attention*4*(h*w)^2  (the latent-resolution
                        stem and its frame-global attention, one latent frame at a time)
                 body = 12*T*H*W + 4*H*W (output, blend weights) + features + per_pixel*th*tw
                        + 24*T*th*tw (one tile's output and its weighted copy)
                 features = 4*stem_channels*t*h*w (the stem output for the whole clip)

    Measured with `benchmarks/decode_memory.py` (exact live tensor bytes at the dispatcher, real
    widths, on the meta device at full size): per_pixel 15,720 (2.1) and 16,425 (2.2) bytes since the
    residual blocks hand their convolutions the only reference to their input (17,200 and 17,450
    before). Formula vs measured: untiled within 0.1% (480p/720p x81, 704p x121); tiled (128, 256
    and 512 px tiles) up to +14%. `attention` counts the score matrices of the math-path attention that
    CPU/meta runs use (fitted: 2.8); CUDA's memory-efficient kernel needs none, so on CUDA the
    720p tiled estimate is high by up to ~1.5 GiB.

    The encode (image tasks; there is no tiled encode) is encode_per_pixel*H*W: the clip stays in
    host memory and moves to the device a chunk at a time (`wan.modules.vae_blocks.encode_in_chunks`).
    Measured the same way (`decode_memory.py --encode`): 11,850 (2.1, 480p and 720p, 17 or 81
    frames: independent of T) and 1,996 (2.2, one frame) bytes per pixel.
    """

    per_pixel: float
    stem_channels: int
    encode_per_pixel: float
    stem_per_cell: float = 0.0
    attention: float = 2.8

    def encode_bytes(self, req: MemoryRequest) -> int:
        return int(self.encode_per_pixel * req.width * req.height)

    def untiled_bytes(self, req: MemoryRequest) -> int:
        return int(12 * req.frames * req.width * req.height + self.per_pixel * req.width * req.height)

    def tiled_bytes(self, req: MemoryRequest, tile_px: int) -> int:
        frames, pixels = req.frames, req.width * req.height
        _, t, h, w = req.latent_shape
        tile = min(tile_px, req.height) * min(tile_px, req.width)
        features = 4 * self.stem_channels * t * h * w
        stem = features + self.stem_per_cell * h * w + self.attention * 4 * (h * w) ** 2
        body = 12 * frames * pixels + 4 * pixels + features + self.per_pixel * tile + 24 * frames * tile
        return int(max(stem, body))


VAE_MODELS = {
    "2.1": VaeMemoryModel(15_720.0, stem_channels=384, encode_per_pixel=11_850.0, stem_per_cell=16 * 384),
    "2.2": VaeMemoryModel(16_425.0, stem_channels=1024, encode_per_pixel=2_000.0, stem_per_cell=16 * 1024),
}


@dataclass(frozen=True)
class Overheads:
    """Fixed costs and allocator behaviour.

    `fragmentation`: peak reserved over the modelled live bytes, per stage, on CUDA with the
    allocator's expandable segments (`magcache_generate.allocator`, the CLI's default). Measured on
    an H100 (torch 2.11, 2026-11-26, `bench_memory.py` at the budget targets): denoising held 0.98-1.01x
    the modelled bytes (before the +5% below). The VAE stages hold more than their live tensors
    (cuDNN convolution workspaces: 0.45-1.31 GiB above the live bytes) plus 5-23% allocator slack:
    reserved was up to 1.35x the modelled bytes for the Wan2.1 encode (i2v 832x480x81: 8.04 GiB)
    and the tiled decode (1280x720x81, 512 px tiles: 8.85 GiB), hence 1.40. Without expandable
    segments the same denoising runs held 0.7-1.9 GiB more (a user's own PYTORCH_CUDA_ALLOC_CONF
    gets no such guarantee).
    `fixed`: cuBLAS/cuDNN workspaces, small tensors, allocator rounding.
    """

    fixed: int = GIB // 4
    t5_activations: int = GIB // 2  # one umT5-xxl forward over 512 tokens, with slack
    fragmentation: dict[str, float] = field(
        default_factory=lambda: {"text": 0.05, "encode": 0.40, "denoise": 0.05, "decode": 0.40}
    )
    t5_default_bytes: int = 11_400_000_000  # models_t5_umt5-xxl-enc-bf16.pth
    vae_default_bytes: dict[str, int] = field(
        default_factory=lambda: {"2.1": 126_892_531 * 4, "2.2": 704_688_668 * 4}
    )


ACTIVATIONS = ActivationModel()
OVERHEADS = Overheads()
CHUNKS = (16384, 8192, 4096, 2048, 1024)  # FFN/modulation token chunks, tried in this order
TILE_PIXELS = (512, 384, 256, 192, 128, 64)  # VAE tile edges (pixels), tried in this order
DEFAULT_TILE_PIXELS = 256  # what --vae-tiled uses when the budget allows (wan.vae's default)


# ----------------------------------------------------------------------------------------------------
# Stage estimates (allocated bytes, before fragmentation)
# ----------------------------------------------------------------------------------------------------


def block_bytes(req: MemoryRequest) -> int:
    """One block's weights as stored: Linears at `linear_bytes`, norms and modulation at `weight_bytes`."""
    linears = block_linear_params(req.dit.dim, req.dit.ffn_dim)
    rest = block_params(req.dit.dim, req.dit.ffn_dim) - linears
    if req.fp8_linears:  # fp8 weights with float32 scales; their biases as stored before
        weights = block_linear_weight_params(req.dit.dim, req.dit.ffn_dim)
        # the output rows of the block Linears: 8 attention projections of dim, ffn.0 and ffn.2
        scales = 8 * req.dit.dim + req.dit.ffn_dim + req.dit.dim if req.fp8_row_scales else BLOCK_LINEARS
        fp8 = weights + 4 * scales
        return fp8 + (linears - weights) * req.linear_bytes + rest * req.weight_bytes
    return linears * req.linear_bytes + rest * req.weight_bytes


def nonblock_bytes(req: MemoryRequest) -> int:
    """Embeddings, time MLPs and head as stored (the embeddings' Linears and conv at `linear_bytes`,
    the float32-read time MLPs and head Linear at 4 bytes)."""
    linears, widened = nonblock_linear_params(req.dit), float32_read_params(req.dit)
    rest = nonblock_params(req.dit) - linears - widened
    return linears * req.linear_bytes + widened * max(4, req.weight_bytes) + rest * req.weight_bytes


def weights_label(req: MemoryRequest) -> str:
    """How the DiT weights are stored, for the plan: 'bf16', 'fp32', 'fp32 (Linears stored bf16 ...)'."""
    name = {2: "bf16", 4: "fp32"}
    label = name.get(req.weight_bytes, f"{req.weight_bytes}-byte")
    if req.linear_bytes != req.weight_bytes:
        label += f" (Linears stored {name.get(req.linear_bytes, f'{req.linear_bytes}-byte')} for autocast)"
    if req.fp8_linears:
        label += "; block Linear weights fp8"
    return label


def _t5_bytes(req: MemoryRequest) -> int:
    return req.t5_bytes or OVERHEADS.t5_default_bytes


def _vae_bytes(req: MemoryRequest) -> int:
    return req.vae_bytes or OVERHEADS.vae_default_bytes[req.task.vae_kind]


def _latent_bytes(req: MemoryRequest) -> int:
    """Noise, the latent, both CFG outputs, their combination and the solver's history (float32); a
    batched CFG forward adds its stacked input (x, the i2v y: counted as 4 latents) and output (2)."""
    return (12 + (6 if req.cfg_batch else 0)) * 4 * math.prod(req.latent_shape)


def _reserved(stage: str, allocated: int) -> int:
    return int(allocated * (1 + OVERHEADS.fragmentation[stage])) + OVERHEADS.fixed


def text_stage(req: MemoryRequest, t5_on_cpu: bool) -> int:
    vae = _vae_bytes(req) if req.vae_during_denoise else 0  # a batch keeps the VAE loaded
    return _reserved("text", vae + (0 if t5_on_cpu else _t5_bytes(req) + OVERHEADS.t5_activations))


def sharded_dit_bytes(req: MemoryRequest) -> int:
    """One expert's weights as a --dit-fsdp rank keeps them: 1/N of every block, the rest whole."""
    return nonblock_bytes(req) + math.ceil(req.dit.num_layers * block_bytes(req) / req.weight_shards)


def denoise_stage(req: MemoryRequest, resident: int, chunk: int | None, t5_on_cpu: bool) -> int:
    n = req.dit.num_layers
    if req.weight_shards > 1:  # every block sharded; the running expert's block and the next gathered
        dit = req.experts_on_device * sharded_dit_bytes(req) + 2 * block_bytes(req)
    else:
        weights = nonblock_bytes(req) + min(resident, n) * block_bytes(req)
        buffers = min(2, n - resident) * block_bytes(req)
        dit = req.experts_on_device * (weights + buffers)
    context = 2 * req.dit.text_len * (req.dit.text_dim + req.dit.dim) * 4
    total = dit + context + _latent_bytes(req)
    total += ACTIVATIONS.forward_bytes(req, chunk)
    if req.vae_during_denoise:
        total += _vae_bytes(req)
    if not req.offload and not t5_on_cpu:
        total += _t5_bytes(req)  # without offloading the text encoder stays
    return _reserved("denoise", total)


def _held_besides_vae(req: MemoryRequest, resident: int, t5_on_cpu: bool, decode: bool = False) -> int:
    """What stays on the device next to the VAE: without offloading, the DiT (not at the decode when
    it is freed first) and the text encoder."""
    if req.offload:
        return 0
    if decode and req.dit_freed_before_decode:
        return 0 if t5_on_cpu else _t5_bytes(req)
    if req.weight_shards > 1:
        dit = sharded_dit_bytes(req)
    else:
        dit = nonblock_bytes(req) + min(resident + 2, req.dit.num_layers) * block_bytes(req)
    return req.experts_on_device * dit + (0 if t5_on_cpu else _t5_bytes(req))


def encode_stage(req: MemoryRequest, resident: int, t5_on_cpu: bool) -> int:
    """The image encode before denoising (0 without an image): i2v encodes a whole clip, ti2v a frame."""
    if not req.image:
        return 0
    work = VAE_MODELS[req.task.vae_kind].encode_bytes(req)  # i2v: a whole clip, ti2v: one frame
    return _reserved("encode", _vae_bytes(req) + work + _held_besides_vae(req, resident, t5_on_cpu))


def decode_stage(req: MemoryRequest, tile_px: int | None, resident: int, t5_on_cpu: bool) -> int:
    model = VAE_MODELS[req.task.vae_kind]
    work = model.untiled_bytes(req) if tile_px is None else model.tiled_bytes(req, tile_px)
    total = (
        _vae_bytes(req) + work + _latent_bytes(req) + _held_besides_vae(req, resident, t5_on_cpu, decode=True)
    )
    return _reserved("decode", total)
