"""Peak memory of the VAE decode (or, with `--encode`, the encode) vs the planner's formula
(`wan.memory_costs.VAE_MODELS`).

The peak is counted exactly at the dispatcher (`wan.testing.live_bytes.LiveBytes`: live tensor bytes,
what CUDA reports as allocated minus rounding and library workspaces), for real-width VAEs:

- at full size on the meta device (no data, so 121 frames at 1280x704 take seconds untiled);
- at small sizes on CPU with real random weights (`--real`), as a check that meta and real agree.

Attention in the VAE's middle block runs the math path here (score matrices materialised); CUDA's
memory-efficient kernel does not, so the stem-phase figures are upper bounds for CUDA.

Examples:
    python benchmarks/decode_memory.py                      # the full-size table (a few minutes)
    python benchmarks/decode_memory.py --real --sizes 2.1:128x128x5,2.2:128x128x5 --tiles 0,64
    python benchmarks/decode_memory.py --encode --sizes 2.1:832x480x81    # the i2v clip encode
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan.configs import TASKS
from wan.memory_costs import GIB, VAE_MODELS, MemoryRequest
from wan.modules.transformer import TransformerConfig
from wan.testing.live_bytes import LiveBytes
from wan.testing.vae import tiny_vae_state_dict
from wan.vae import VaeConfig, WanVAE, vae_from_state_dict

REAL_CONFIGS = {"2.1": VaeConfig("2.1", 96, 96, 16, 2), "2.2": VaeConfig("2.2", 160, 256, 48, 2)}
TASK_OF = {"2.1": "t2v-A14B", "2.2": "ti2v-5B"}
DEFAULT_SIZES = "2.1:832x480x81,2.1:1280x720x81,2.2:1280x704x121"


def build(kind: str, real: bool) -> WanVAE:
    cfg = REAL_CONFIGS[kind]
    if real:
        state = tiny_vae_state_dict(kind, dim=cfg.dim, dec_dim=cfg.dec_dim)
        return vae_from_state_dict(state)
    with torch.device("meta"):
        return WanVAE(cfg.build().eval())


def formula(
    kind: str, width: int, height: int, frames: int, tile_px: int | None, encode: bool = False
) -> int:
    dit = TransformerConfig("t2v", 16, 16, 64, 128, 2, 1)  # only patch_size/out_dim matter here
    req = MemoryRequest(TASKS[TASK_OF[kind]], dit, width, height, frames, budget=0)
    model = VAE_MODELS[kind]
    if encode:
        return model.encode_bytes(req)
    return model.untiled_bytes(req) if tile_px is None else model.tiled_bytes(req, tile_px)


def measure_encode(vae: WanVAE, width: int, height: int, frames: int) -> int:
    """Live bytes of encoding a clip held in host memory, as the pipeline does (its chunks move to
    the device one at a time; the clip itself is not counted)."""
    video = torch.zeros(1, 3, frames, height, width)
    with torch.no_grad(), LiveBytes() as live:
        mu = vae.model.encode(video, vae.device, torch.float32)
    del video, mu
    gc.collect()
    return live.peak


def measure(vae: WanVAE, width: int, height: int, frames: int, tile_px: int | None) -> int:
    s = vae.stride[1]
    z = torch.randn(1, vae.z_dim, (frames - 1) // 4 + 1, height // s, width // s, device=vae.device)
    with torch.no_grad(), LiveBytes() as live:
        # the wrapper's autocast guard does not exist on meta; its other work is element-wise on z
        video = vae.model.decode(z) if tile_px is None else vae._decode_tiled(z, tile_px // s, None)
    del video
    gc.collect()
    return live.peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated KIND:WxHxFRAMES")
    parser.add_argument("--tiles", default="0,256", help="tile edges in pixels; 0 = untiled")
    parser.add_argument("--real", action="store_true", help="real random weights on CPU (small sizes!)")
    parser.add_argument("--encode", action="store_true", help="measure the encode of a clip instead")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.encode:
        args.tiles = "0"  # there is no tiled encode
    torch.set_num_threads(2)
    rows = []
    vaes: dict[str, WanVAE] = {}
    for item in args.sizes.split(","):
        kind, dims = item.split(":")
        width, height, frames = (int(v) for v in dims.lower().split("x"))
        vae = vaes.setdefault(kind, build(kind, args.real))
        for tile in (int(t) or None for t in args.tiles.split(",")):
            start = time.perf_counter()
            if args.encode:
                measured = measure_encode(vae, width, height, frames)
            else:
                measured = measure(vae, width, height, frames, tile)
            predicted = formula(kind, width, height, frames, tile, args.encode)
            rows.append(
                {
                    "vae": kind,
                    "size": f"{width}x{height}x{frames}",
                    "stage": "encode" if args.encode else "decode",
                    "tile_px": tile,
                    "measured_gib": round(measured / GIB, 3),
                    "formula_gib": round(predicted / GIB, 3),
                    "error": round(predicted / measured - 1, 3),
                    "device": "cpu" if args.real else "meta",
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(json.dumps(rows[-1]) if args.json else _line(rows[-1]), flush=True)


def _line(row: dict) -> str:
    tile = f"{row['tile_px']} px tiles" if row["tile_px"] else "untiled"
    tile = "encode" if row["stage"] == "encode" else tile
    return (
        f"Wan{row['vae']} {row['size']:>14} {tile:>13}: measured {row['measured_gib']:7.3f} GiB, "
        f"formula {row['formula_gib']:7.3f} GiB ({row['error']:+.1%}) [{row['device']}, {row['seconds']} s]"
    )


if __name__ == "__main__":
    main()
