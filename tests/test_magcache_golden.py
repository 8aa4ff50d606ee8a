"""MagCache in the sampling loop vs the official MagCache4Wan2.2 script (`magcache_*` goldens).

Official mode must reproduce the per-call computed/skipped flags exactly and the latents within
max abs <= 1e-4 * (1 + max |ref|) after every step (fp32; measured ~1e-6). Inputs (noise, contexts,
image) are injected from the golden; settings come from its parsed argv.
"""

import pytest
import torch
from goldens import entry, golden_params, tensors, weights_path
from PIL import Image

import wan
from magcache_generate.magcache.plan import plan
from magcache_generate.magcache.policy import MagCacheConfig
from magcache_generate.magcache.ratios import official_curve
from magcache_generate.magcache.residual_cache import ResidualCache
from wan.conditioning import Conditioning, i2v_mask, i2v_video
from wan.configs import TASKS
from wan.image_prep import i2v_first_frame, ti2v_first_frame
from wan.sampling import sample
from wan.schedule import make_schedule
from wan.testing.models import StaticModels


def close(a, b, rel=1e-4):
    err = (a - b).abs().max().item()
    assert err <= rel * (1 + b.abs().max().item()), err


class RecordingCache(ResidualCache):
    def __init__(self, p):
        super().__init__(p)
        self.computed = []

    def run(self, h, blocks):
        ran = []

        def counted(x):
            ran.append(True)
            return blocks(x)

        out = super().run(h, counted)
        self.computed.append(bool(ran))
        return out


@pytest.mark.parametrize("name", golden_params("magcache"))
def test_magcache_official_matches_script(name):
    e = entry(name)
    data = tensors(name)
    args = e["parsed_args"]
    task = TASKS[e["task"]]
    dits = [w for w in e["weights"] if not w.startswith(("vae", "t5"))]
    models = {}
    for w in dits:
        models["single" if len(dits) == 1 else ("high" if "high" in w else "low")] = wan.load_transformer(
            weights_path(w)
        )
    sched = make_schedule(args["sample_solver"], args["sample_steps"], args["sample_shift"])
    assert torch.equal(sched.timesteps, data["sched.timesteps"])
    conditioning = Conditioning()
    if "input.image_uint8" in data:
        vae = wan.load_vae(weights_path(next(w for w in e["weights"] if w.startswith("vae"))))
        image = Image.fromarray(data["input.image_uint8"].numpy())
        area = e["size_entry"]["MAX_AREA_CONFIGS"]
        if task.name == "i2v-A14B":
            z = vae.encode(i2v_video(i2v_first_frame(image, area), args["frame_num"])[None])
            y = torch.cat([i2v_mask(args["frame_num"], z.shape[3], z.shape[4])[None], z], dim=1)
            conditioning = Conditioning(y=y)
        else:
            z = vae.encode(ti2v_first_frame(image, area)[None, :, None])
            conditioning = Conditioning(first_frame=z)
        close(z[0], data["vae.encode_output.0"])
    config = MagCacheConfig(
        thresh=args["magcache_thresh"],
        K=args["magcache_K"],
        retention=args["retention_ratio"],
        mode="official",
    )
    timesteps = [int(t) for t in sched.timesteps[: len(sched)]]
    curve = official_curve(task.name, args.get("image") is not None)
    p = plan(task.name, timesteps, task.boundary, config, curve, shift=args["sample_shift"])
    cache = RecordingCache(p)
    guide = args["sample_guide_scale"]
    if guide is None:
        guide = task.guide_scale
    guide = tuple(guide) if isinstance(guide, list | tuple) else (guide, guide)
    final = sample(
        data["input.noise"][None],
        sched,
        StaticModels(models),
        [data["input.context_cond"]],
        [data["input.context_uncond"]],
        guide_scale=guide,
        boundary=task.boundary,
        conditioning=conditioning,
        cache=cache,
        on_step=lambda info: None,
    )
    assert cache.computed == data["call.computed"].tolist()
    assert p.dense_forwards - p.forwards == e["n_skipped"]
    close(final[0], data["output.latent"])
