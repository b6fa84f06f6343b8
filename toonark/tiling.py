"""Pictures larger than the built profile: tiled inference with Hann-weighted blending.

    plan = TilePlan.for_size(limits, dims, height=2048, width=2048)        # tiles the UNet profile accepts
    unet = TiledUnet(unet_call, plan, batch=1)                             # feeds (full size) -> noise pred
    vae = TiledVae(engine.run, "vae_decoder", limits, dims)                # engine-like .run, tiled when needed

The latent is cut into overlapping tiles of a size the UNet profile accepts (default: the profile's
largest image, overlap a quarter of it). Every step each tile's noise prediction is weighted by a 2-D
Hann window and the weighted sum is divided by the summed weights (MultiDiffusion, arXiv 2302.08113,
with Hann weights instead of uniform ones so a tile's contribution fades out towards its edge and no seam
shows). Guidance and the solver update are linear, so blending the UNet output is the same as blending
the guided prediction. The VAE decoder and encoder are tiled the same way (decode: latent tiles decoded,
blended in pixel space; encode: pixel tiles encoded, blended in latent space). A window is flat on a side
that lies on the picture's border, where no other tile overlaps, so the weights never vanish there.

Requests up to the profile's maximum run untiled, exactly as before; above it up to MAX_TILED_IMAGE
pixels a side they are tiled. `seam_score` is the measure README's thresholds are stated in.

Core module: numpy only. Offline pipeline and served models wrap the very same engine callables in
these classes, so served pixels equal offline ones for tiled sizes too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from toonark.specs import SD, PipelineDims, ShapeLimits

# The largest side a tiled request may ask for (pixels). Work grows with the area: a 4096^2 picture
# is ~64 UNet tiles of 512^2 per step at the default overlap.
MAX_TILED_IMAGE = 4096


def check_size(limits: ShapeLimits, batch: int, height: int, width: int) -> None:
    """ShapeLimits.check_request, except that a side above the profile's maximum is allowed (tiled) up to
    MAX_TILED_IMAGE when it is a multiple of the image step. ValueError names the value and the range."""
    for label, value in (("width", width), ("height", height)):
        if value > limits.max_image:
            if value > MAX_TILED_IMAGE or value % limits.image_step:
                raise ValueError(f"{label} {value} must be a multiple of {limits.image_step} in "
                                 f"{limits.min_image}..{MAX_TILED_IMAGE} (above the built profile's "
                                 f"{limits.max_image} pictures are made in tiles, up to {MAX_TILED_IMAGE})")
    limits.check_request(batch, min(height, limits.max_image), min(width, limits.max_image))


def axis_tiles(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` cells covering 0..length with neighbours overlapping by at least
    `overlap` cells (evenly spread, so the real overlap is >= overlap)."""
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in 0..{tile - 1} (tile {tile})")
    count = math.ceil((length - overlap) / (tile - overlap))
    return [int(round(i * (length - tile) / (count - 1))) for i in range(count)]


def hann_window(size: int, flat_start: bool, flat_end: bool) -> np.ndarray:
    """1-D Hann weights over a tile, 0.5 - 0.5 cos(2 pi (i + 0.5) / size) (never exactly 0), set to 1 on
    the half that lies on the picture's border (nothing else covers it there)."""
    w = 0.5 - 0.5 * np.cos(2 * np.pi * (np.arange(size) + 0.5) / size)
    half = size // 2
    if flat_start:
        w[:half] = 1.0
    if flat_end:
        w[half:] = 1.0
    return w


@dataclass(frozen=True)
class TilePlan:
    """Tiles over a latent of (height, width) cells: tile (th, tw) cells at the start offsets ys x xs."""
    height: int
    width: int
    tile_h: int
    tile_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    overlap: int

    @property
    def tiled(self) -> bool:
        return len(self.ys) * len(self.xs) > 1

    @property
    def grid(self) -> tuple[int, int]:
        return len(self.ys), len(self.xs)

    @property
    def boxes(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]

    def describe(self, scale: int = 1) -> str:
        """"3x2 tiles of 512x512 px, overlap 128 px": columns x rows, like the sizes width x height (scale: pixels
        per cell, the VAE's 8 for latents)."""
        return (f"{self.grid[1]}x{self.grid[0]} tiles of {self.tile_w * scale}x{self.tile_h * scale} px, "
                f"overlap {self.overlap * scale} px")

    def weights(self, scale: int = 1) -> list[np.ndarray]:
        """Per tile, the 2-D Hann weights (tile_h*scale, tile_w*scale), float32 (scale: cells -> pixels)."""
        out = []
        th, tw = self.tile_h * scale, self.tile_w * scale
        for y, x in self.boxes:
            wy = hann_window(th, y == 0, y + self.tile_h >= self.height)
            wx = hann_window(tw, x == 0, x + self.tile_w >= self.width)
            out.append(np.outer(wy, wx).astype(np.float32))
        return out

    @classmethod
    def for_size(cls, limits: ShapeLimits, dims: PipelineDims, height: int, width: int, tile: int | None = None,
                 overlap: int | None = None) -> "TilePlan":
        """The latent tile plan of a height x width pixel picture: tiles of `tile` pixels a side (default the
        profile's max image; at most that, at least its min, a multiple of the image step) overlapping by
        `overlap` pixels (default tile / 4, a multiple of the VAE scale). One tile when the picture fits."""
        tile, overlap = tile_parameters(limits, dims, tile, overlap)
        if height <= limits.max_image and width <= limits.max_image:
            scale = dims.vae_scale
            return cls(height // scale, width // scale, height // scale, width // scale, (0,), (0,), overlap // scale)
        return cls.cover(dims, height, width, tile, overlap)

    @classmethod
    def cover(cls, dims: PipelineDims, height: int, width: int, tile: int, overlap: int) -> "TilePlan":
        """Tiles of `tile` pixels overlapping by `overlap` over a height x width picture, also when it would fit
        untiled (the tiled-vs-untiled measurements)."""
        scale = dims.vae_scale
        lh, lw, lt, lo = height // scale, width // scale, tile // scale, overlap // scale
        th, tw = min(lt, lh), min(lt, lw)
        return cls(lh, lw, th, tw, tuple(axis_tiles(lh, th, lo)), tuple(axis_tiles(lw, tw, lo)), lo)


def tile_parameters(limits: ShapeLimits, dims: PipelineDims, tile: int | None, overlap: int | None) -> tuple[int, int]:
    """(tile, overlap) in pixels with the profile's defaults, checked: ValueError names the allowed values."""
    tile = limits.max_image if tile is None or tile == 0 else int(tile)
    if tile % limits.image_step or not limits.min_image <= tile <= limits.max_image:
        raise ValueError(f"tile size {tile} must be a multiple of {limits.image_step} in {limits.min_image}.."
                         f"{limits.max_image} (sizes the UNet profile accepts)")
    overlap = (tile // 4) // dims.vae_scale * dims.vae_scale if overlap is None or overlap < 0 else int(overlap)
    if overlap % dims.vae_scale or not 0 <= overlap <= tile // 2:
        raise ValueError(f"tile overlap {overlap} must be a multiple of {dims.vae_scale} in 0..{tile // 2} "
                         f"(tile {tile})")
    return tile, overlap


BLENDS = ("hann", "uniform", "paste")


def blend(tiles: list[np.ndarray], plan: TilePlan, scale: int = 1, mode: str = "hann") -> np.ndarray:
    """Weighted sum of per-tile arrays (N, C, th*scale, tw*scale) over the full (N, C, H*scale, W*scale),
    divided by the summed Hann weights. The other modes are the controls the seam score is checked
    against: "uniform" (plain averaging of the overlaps: MultiDiffusion's weights) and "paste" (each tile
    overwrites the overlap: a hard stitch)."""
    if mode not in BLENDS:
        raise ValueError(f"blend mode {mode!r} is not one of {', '.join(BLENDS)}")
    first = tiles[0]
    out = np.zeros(first.shape[:2] + (plan.height * scale, plan.width * scale), np.float64)
    total = np.zeros((plan.height * scale, plan.width * scale), np.float64)
    for (y, x), weight, tile in zip(plan.boxes, plan.weights(scale), tiles):
        ys, xs = slice(y * scale, y * scale + weight.shape[0]), slice(x * scale, x * scale + weight.shape[1])
        if mode == "paste":
            out[:, :, ys, xs] = tile
            total[ys, xs] = 1.0
            continue
        if mode == "uniform":
            weight = np.ones_like(weight)
        out[:, :, ys, xs] += tile.astype(np.float64) * weight
        total[ys, xs] += weight
    return (out / total).astype(first.dtype)


def _crop(array: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    return np.ascontiguousarray(array[:, :, y:y + h, x:x + w])


class TiledUnet:
    """A UNet callable (feeds -> noise prediction) over full-size latents, run tile by tile: several tiles
    share one call in the batch axis (up to the profile's max batch), and the tiles' predictions are
    blended with Hann weights. `calls` counts the UNet calls of the last step."""

    def __init__(self, unet: Callable[[dict], np.ndarray], plan: TilePlan, max_rows: int, mode: str = "hann"):
        self.unet, self.plan, self.mode = unet, plan, mode
        self.max_rows = max_rows   # the UNet profile's batch axis (2 x max_batch)
        self.calls = 0

    def __call__(self, feeds: dict) -> np.ndarray:
        plan = self.plan
        if not plan.tiled:
            self.calls = 1
            return self.unet(feeds)
        sample, text = feeds[SD.sample], feeds[SD.encoder_hidden_states]
        rows = sample.shape[0]
        per_call = max(1, self.max_rows // rows)
        outputs, boxes = [], plan.boxes
        self.calls = 0
        for start in range(0, len(boxes), per_call):
            group = boxes[start:start + per_call]
            tiles = np.concatenate([_crop(sample, y, x, plan.tile_h, plan.tile_w) for y, x in group])
            out = self.unet({SD.sample: tiles, SD.timestep: feeds[SD.timestep],
                             SD.encoder_hidden_states: np.concatenate([text] * len(group))})
            self.calls += 1
            outputs += np.split(np.asarray(out), len(group))
        return blend(outputs, plan, 1, self.mode)


class TiledVae:
    """An engine-like object (`run(feeds) -> {output: array}`) for the VAE decoder or encoder that cuts
    pictures above the profile into overlapping tiles and blends them with Hann weights: the decoder in
    pixel space, the encoder in latent space. Within the profile it is the engine call itself."""

    def __init__(self, run: Callable[[dict], dict], name: str, limits: ShapeLimits, dims: PipelineDims,
                 tile: int | None = None, overlap: int | None = None, always: bool = False, mode: str = "hann"):
        if name not in ("vae_decoder", "vae_encoder"):
            raise ValueError(f"TiledVae tiles vae_decoder or vae_encoder, not {name!r}")
        self._run, self.name, self.limits, self.dims = run, name, limits, dims
        self.tile, self.overlap = tile_parameters(limits, dims, tile, overlap)
        self.always, self.mode = always, mode   # tile also pictures that fit; blend mode (measurements)
        self.last_plan: TilePlan | None = None

    def run(self, feeds: dict) -> dict:
        scale = self.dims.vae_scale
        decoder = self.name == "vae_decoder"
        (key, value), = feeds.items()
        height, width = value.shape[2] * (scale if decoder else 1), value.shape[3] * (scale if decoder else 1)
        plan = (TilePlan.cover(self.dims, height, width, self.tile, self.overlap) if self.always
                else TilePlan.for_size(self.limits, self.dims, height, width, self.tile, self.overlap))
        self.last_plan = plan
        if not plan.tiled:
            return self._run(feeds)
        output = SD.image if decoder else SD.latent_parameters
        per_call = max(1, self.limits.max_batch // value.shape[0])
        boxes, tiles = plan.boxes, []
        cut = 1 if decoder else scale     # input cells per latent cell
        for start in range(0, len(boxes), per_call):
            group = boxes[start:start + per_call]
            batch = np.concatenate([_crop(value, y * cut, x * cut, plan.tile_h * cut, plan.tile_w * cut)
                                    for y, x in group])
            out = np.asarray(self._run({key: batch})[output])
            tiles += np.split(out, len(group))
        return {output: blend(tiles, plan, scale if decoder else 1, self.mode)}


def seam_score(images: np.ndarray, plan: TilePlan, scale: int, band: int = 1) -> float:
    """Gradient energy on the tile borders / gradient energy inside the tiles, for (N, C, H, W) pictures.
    The borders are the pixel columns (rows) where a tile starts or ends inside the picture; the energy is
    the mean squared difference between neighbouring pixels across such a line (within `band` of it),
    against the same mean over every other neighbouring pair. A hard stitch makes the ratio large; ~1 is
    no visible seam."""
    x = images.astype(np.float64)
    dx = (x[..., :, 1:] - x[..., :, :-1]) ** 2      # pairs (j-1, j) at index j-1
    dy = (x[..., 1:, :] - x[..., :-1, :]) ** 2
    cols = {c * scale for x0 in plan.xs for c in (x0, x0 + plan.tile_w)} - {0, plan.width * scale}
    rows = {r * scale for y0 in plan.ys for r in (y0, y0 + plan.tile_h)} - {0, plan.height * scale}
    col_mask = np.zeros(dx.shape[-1], bool)
    for c in cols:   # pair (c-1, c) straddles the line
        col_mask[max(c - band, 0):c + band - 1] = True
    row_mask = np.zeros(dy.shape[-2], bool)
    for r in rows:
        row_mask[max(r - band, 0):r + band - 1] = True
    border = np.concatenate([dx[..., col_mask].ravel(), dy[..., row_mask, :].ravel()])
    inside = np.concatenate([dx[..., ~col_mask].ravel(), dy[..., ~row_mask, :].ravel()])
    if border.size == 0:
        return 1.0
    return float(border.mean() / max(inside.mean(), 1e-30))


def tiling_parameter(limits: ShapeLimits, dims: PipelineDims, tile: int | None = None,
                     overlap: int | None = None) -> str:
    """The served models' `tiling` config parameter: "tile=512,overlap=128,max_image=768,vae_scale=8" (tile and
    overlap resolved to pixels), read by denoise and the VAE runners, and by the client to print the grid."""
    tile, overlap = tile_parameters(limits, dims, tile, overlap)
    return f"tile={tile},overlap={overlap},max_image={limits.max_image},vae_scale={dims.vae_scale}"


def parse_tiling_parameter(text: str) -> dict[str, int]:
    try:
        values = {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}
    except ValueError:
        raise ValueError(f"tiling parameter {text!r} is not 'tile=..,overlap=..,max_image=..,vae_scale=..'; "
                         f"regenerate the repository with `make repo`") from None
    missing = {"tile", "overlap", "max_image", "vae_scale"} - set(values)
    if missing:
        raise ValueError(f"tiling parameter {text!r} lacks {sorted(missing)}; regenerate the repository with `make repo`")
    return values


def describe_grid(text: str, height: int, width: int) -> str:
    """The tile grid a served height x width request runs with (the client's --timings line)."""
    p = parse_tiling_parameter(text)
    if height <= p["max_image"] and width <= p["max_image"]:
        return f"untiled ({width}x{height} fits the profile's {p['max_image']} px)"
    scale = p["vae_scale"]
    lh, lw, lt, lo = height // scale, width // scale, p["tile"] // scale, p["overlap"] // scale
    plan = TilePlan(lh, lw, min(lt, lh), min(lt, lw), tuple(axis_tiles(lh, min(lt, lh), lo)),
                    tuple(axis_tiles(lw, min(lt, lw), lo)), lo)
    return plan.describe(scale)
