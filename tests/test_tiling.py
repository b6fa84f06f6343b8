"""Tiled inference (toonark/tiling.py): the grid, the Hann blend (a partition of unity), and on the tiny
pipeline the tiled-vs-untiled difference and the seam score against the README's thresholds, with the
plain-average and hard-stitch controls showing the measures can fail."""
from __future__ import annotations

import numpy as np
import pytest

from toonark import tiling
from toonark.specs import SD, PipelineDims, ShapeLimits

DIMS = PipelineDims(text_length=77, text_hidden=32, latent_channels=4, vae_scale=8, vae_scaling_factor=0.18215)
LIMITS = ShapeLimits(min_batch=1, opt_batch=1, max_batch=2, min_image=64, opt_image=128, max_image=256, image_step=64)

# README "Large pictures": 256x256 in 3x3 tiles of 128 px (32 px overlap), 8 steps, UNet and VAE tiled,
# against the untiled picture (images in [-1, 1]). Measured: Hann 0.28 / 0.023, seam ratio 1.01; plain
# averaging 0.84 / 0.047, 1.22; hard stitch 1.66 / 0.055, 2.14.
MAX_DIFF, MEAN_DIFF, MAX_SEAM_RATIO = 0.5, 0.035, 1.1


def test_grid_covers_with_the_overlap_and_tiles_the_profile_accepts():
    assert tiling.axis_tiles(32, 32, 4) == [0]
    starts = tiling.axis_tiles(100, 32, 8)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert all(b - a <= 32 - 8 for a, b in zip(starts, starts[1:]))   # neighbours overlap by >= 8
    plan = tiling.TilePlan.for_size(LIMITS, DIMS, 384, 320)
    assert plan.tiled and (plan.tile_h, plan.tile_w) == (32, 32) and plan.grid == (2, 2)
    assert plan.describe(8) == "2x2 tiles of 256x256 px, overlap 64 px"
    assert not tiling.TilePlan.for_size(LIMITS, DIMS, 256, 192).tiled
    assert tiling.TilePlan.for_size(LIMITS, DIMS, 1024, 192).grid == (5, 1)   # the short side: one tile of 192
    with pytest.raises(ValueError, match=r"^tile size 100 must be a multiple of 64 in 64..256"):
        tiling.TilePlan.for_size(LIMITS, DIMS, 512, 512, tile=100)
    with pytest.raises(ValueError, match=r"^tile overlap 12 must be a multiple of 8 in 0..64"):
        tiling.TilePlan.for_size(LIMITS, DIMS, 512, 512, tile=128, overlap=12)
    with pytest.raises(ValueError, match=r"^width 4160 must be a multiple of 64 in 64..4096"):
        tiling.check_size(LIMITS, 1, 64, 4160)
    with pytest.raises(ValueError, match=r"^height 300 must be a multiple of 64 in 64..4096"):
        tiling.check_size(LIMITS, 1, 300, 64)
    tiling.check_size(LIMITS, 2, 4096, 256)


@pytest.mark.parametrize("mode", tiling.BLENDS)
def test_blending_tiles_of_one_picture_gives_the_picture_back(mode):
    """Every blend is a partition of unity: tiles cut from one array blend back to exactly that array (so all
    the tiled-vs-untiled difference is the model's, none the bookkeeping's), also through TiledUnet's batching."""
    rng = np.random.default_rng(0)
    full = rng.standard_normal((2, 4, 50, 70)).astype(np.float32)
    plan = tiling.TilePlan.cover(DIMS, 50 * 8, 70 * 8, 128, 32)
    assert plan.grid == (4, 6)
    tiles = [full[:, :, y:y + plan.tile_h, x:x + plan.tile_w] for y, x in plan.boxes]
    np.testing.assert_allclose(tiling.blend(tiles, plan, mode=mode), full, atol=1e-6)
    calls = []

    def unet(feeds):   # the identity "UNet": returns its sample; checks the text rows follow the tiles
        calls.append(feeds[SD.sample].shape[0])
        assert feeds[SD.encoder_hidden_states].shape[0] == feeds[SD.sample].shape[0]
        return feeds[SD.sample]
    out = tiling.TiledUnet(unet, plan, max_rows=4, mode=mode)({SD.sample: full, SD.timestep: np.ones(1, np.float32),
                                                               SD.encoder_hidden_states: np.zeros((2, 77, 32))})
    np.testing.assert_allclose(out, full, atol=1e-6)
    assert calls == [4] * 12   # 24 tiles, 2 per call (2 CFG rows each, 4 rows a call)


def test_hann_window_is_flat_on_the_picture_border():
    w = tiling.hann_window(16, True, False)
    assert (w[:8] == 1).all() and w[-1] < 0.01 and w.min() > 0
    assert tiling.hann_window(16, False, False)[0] < 0.01


@pytest.fixture(scope="module")
def pipe(tiny_engines):
    from toonark.engines.pipeline import load_pipeline
    return load_pipeline(tiny_engines, backend="ort-cpu", precision="fp32", threads=1)


def tiled_picture(pipe, mode: str, steps: int = 8, size: int = 256, tile: int = 128, overlap: int = 32):
    """The pipeline's picture with UNet and VAE forced into tiles (at a size the profile also runs untiled)."""
    from toonark.pipeline import decode, denoise_latents, initial_latents
    plan = tiling.TilePlan.cover(pipe.dims, size, size, tile, overlap)
    engine = pipe.engines["unet"]
    unet = tiling.TiledUnet(lambda feeds: engine.run(feeds)[SD.noise_pred], plan, 2 * pipe.limits.max_batch, mode)
    text, _, _ = pipe.encode_text(["a happy fox"], [""])
    latents, _, _ = denoise_latents(pipe.scheduler, initial_latents(1, 1, pipe.dims, size, size), text,
                                    pipe.scheduler.schedule(steps), 7.5, unet)
    vae = tiling.TiledVae(pipe.engines["vae_decoder"].run, "vae_decoder", pipe.limits, pipe.dims, tile, overlap,
                          always=True, mode=mode)
    return decode(vae, latents, pipe.dims), plan


def test_tiled_picture_is_close_to_the_untiled_one_without_seams(pipe):
    untiled = pipe("a happy fox", negative_prompt="", seed=1, steps=8, width=256, height=256).decoded
    scores = {}
    for mode in tiling.BLENDS:
        picture, plan = tiled_picture(pipe, mode)
        diff = np.abs(picture - untiled)
        ratio = tiling.seam_score(picture, plan, pipe.dims.vae_scale) / tiling.seam_score(untiled, plan, 8)
        scores[mode] = (float(diff.max()), float(diff.mean()), ratio)
        print(f"{mode}: max |tiled - untiled| {diff.max():.3f}, mean {diff.mean():.4f}, seam ratio {ratio:.3f}")
    max_diff, mean_diff, ratio = scores["hann"]
    assert max_diff < MAX_DIFF and mean_diff < MEAN_DIFF and ratio < MAX_SEAM_RATIO
    # the controls fail the same thresholds: the measures see a plain average and a hard stitch
    for mode in ("uniform", "paste"):
        max_diff, mean_diff, ratio = scores[mode]
        assert max_diff > MAX_DIFF and ratio > MAX_SEAM_RATIO, mode


def test_tiled_vae_decode_and_encode(pipe):
    """The VAE alone, tiled vs untiled at 256 px in 3x3 tiles of 128 px (numbers in the README); the hard
    stitch is the seamier one."""
    from toonark.image_input import pixels
    from test_editing import picture
    image = pixels(picture(256), 256, 256)
    encoder = pipe.engines["vae_encoder"]
    parameters = encoder.run({SD.image: image})[SD.latent_parameters]
    tiled_parameters = tiling.TiledVae(encoder.run, "vae_encoder", pipe.limits, pipe.dims, 128, 32,
                                       always=True).run({SD.image: image})[SD.latent_parameters]
    assert tiled_parameters.shape == parameters.shape
    latents = parameters[:, :4]
    untiled = pipe.engines["vae_decoder"].run({SD.latent_sample: latents})[SD.image]
    ratios = {}
    for mode in ("hann", "paste"):
        vae = tiling.TiledVae(pipe.engines["vae_decoder"].run, "vae_decoder", pipe.limits, pipe.dims, 128, 32,
                              always=True, mode=mode)
        tiled = vae.run({SD.latent_sample: latents})[SD.image]
        ratios[mode] = tiling.seam_score(tiled, vae.last_plan, 8) / tiling.seam_score(untiled, vae.last_plan, 8)
        print(f"decode {mode}: mean |tiled - untiled| {np.abs(tiled - untiled).mean():.4f}, seam ratio "
              f"{ratios[mode]:.3f}")
    assert ratios["hann"] < MAX_SEAM_RATIO < ratios["paste"]


def test_gpu_tiles_script_runs_on_the_cpu(tiny_engines, tmp_path):
    """benchmarks/gpu_tiles.py --tiny: the GPU script's code path (one size, the VAE decoder) on ORT CPU."""
    import json
    from toonark.benchmarks.gpu_tiles import main
    assert main(["--tiny", "--build", str(tiny_engines), "--out", str(tmp_path), "--sizes", "256",
                 "--submodels", "vae_decoder", "--reps", "1"]) == 0
    rows = json.loads((tmp_path / "tiles.json").read_text())["rows"]
    assert [(r["case"]["mode"], r["tiles"]) for r in rows] == [
        ("untiled", "untiled"), ("tiled", "3x3 tiles of 128x128 px, overlap 32 px")]
    assert rows[1]["compare"]["seam_ratio"] < 1.1 and rows[0]["median_ms"] > 0
