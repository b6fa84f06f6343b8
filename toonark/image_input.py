"""Pictures sent with a request (IMAGE_IN, MASK_IN): bounded decoding and the tensors the sampler reads.

    edit = read_edit(image_bytes, mask_bytes, strength=0.6, width=None, height=None, limits=info.limits)
    edit.image   # (1, 3, H, W) float32 in [-1, 1]      (diffusers' VaeImageProcessor.preprocess)
    edit.mask    # (1, 1, H, W) float32 in {0, 1}, 1 = repaint, or None (mask_processor: grey, binarised)

Decoding is bounded: the file size and the pixel count (read from the header, before any pixel is
decoded) are checked against MAX_IMAGE_BYTES / MAX_IMAGE_PIXELS, only the PNG, WebP and JPEG decoders
are tried, and a truncated file, a CMYK or 16-bit picture or an animated one is refused with a message
naming the problem and the fix (api.RequestError: HTTP 400), before any model runs.

Core module: numpy and Pillow (imported when a picture arrives).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from toonark.api import RequestError

MAX_IMAGE_BYTES = 20 * 2 ** 20          # a 4096^2 photo as JPEG is ~5-10 MB; PNG of a drawing much less
MAX_IMAGE_PIXELS = 4096 * 4096          # the largest picture tiling makes (toonark.tiling.MAX_TILED_IMAGE)
IMAGE_IN_FORMATS = ("PNG", "WEBP", "JPEG")
# Pillow modes that are 8 bits a channel and convert to RGB as diffusers converts them (image.convert("RGB")).
_RGB_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "YCbCr")


@dataclass(frozen=True)
class EditInput:
    """A request's picture (and mask) at the request's size, and the strength it is edited with."""
    image: np.ndarray                 # (1, 3, H, W) float32 in [-1, 1]
    mask: np.ndarray | None           # (1, 1, H, W) float32 {0, 1}: 1 = repaint
    strength: float


def _png_bit_depth(data: bytes) -> int | None:
    """The IHDR bit depth of a PNG (Pillow reads 16-bit RGB as 8-bit RGB silently)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 24:
        return data[24]
    return None


def _too_many(name: str, count, max_pixels: int) -> str:
    return (f"{name} has {count} pixels, more than the {max_pixels} allowed (a decompression bomb, or just too "
            f"large); send a smaller picture")


def decode_picture(data, name: str = "IMAGE_IN", *, max_bytes: int = MAX_IMAGE_BYTES,
                   max_pixels: int = MAX_IMAGE_PIXELS):
    """One PNG / WebP / JPEG file -> an 8-bit PIL image, fully decoded, or RequestError naming the problem."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(data, np.ndarray):
        data = data.reshape(-1)
        if data.size != 1:
            raise RequestError(f"{name} must hold exactly one file, got {data.size}")
        data = data[0]
    if isinstance(data, str):
        raise RequestError(f"{name} must be the bytes of a PNG, WebP or JPEG file, not text")
    data = bytes(data)
    if not data:
        raise RequestError(f"{name} is empty: send the bytes of a PNG, WebP or JPEG file")
    if len(data) > max_bytes:
        raise RequestError(f"{name} is {len(data) / 2 ** 20:.1f} MiB, more than the {max_bytes / 2 ** 20:.0f} MiB "
                           f"allowed; send a smaller file (JPEG or WebP compress photos well)")
    try:
        # Only these decoders are tried; Image.open reads the header only, so the size check below comes first.
        image = Image.open(io.BytesIO(data), formats=list(IMAGE_IN_FORMATS))
    except UnidentifiedImageError:
        raise RequestError(f"{name} is not a PNG, WebP or JPEG file (or its header is damaged); send one of "
                           f"those formats") from None
    except Image.DecompressionBombError as err:   # Pillow's own limit (far above ours) refuses at open
        import re
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise RequestError(_too_many(name, int(found.group(1)) if found else "too many", max_pixels)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(_too_many(name, width * height, max_pixels))
    if getattr(image, "is_animated", False) or getattr(image, "n_frames", 1) > 1:
        raise RequestError(f"{name} is an animated {image.format} ({getattr(image, 'n_frames', '?')} frames); "
                           f"send a single still picture (export one frame as PNG)")
    if image.mode == "CMYK":
        raise RequestError(f"{name} is a CMYK {image.format} (a print colour space); convert it to RGB and "
                           f"send it again")
    depth = _png_bit_depth(data)
    if (depth is not None and depth > 8) or image.mode.startswith("I") or image.mode == "F":
        raise RequestError(f"{name} is a 16-bit {image.format} (mode {image.mode}); save it with 8 bits a "
                           f"channel and send it again")
    if image.mode not in _RGB_MODES:
        raise RequestError(f"{name} has the colour mode {image.mode}, which toonark does not read; save it as "
                           f"8-bit RGB")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:   # "image file is truncated", broken chunks, bad data
        raise RequestError(f"{name} is truncated or corrupt ({err}); send the complete file") from None
    return image


def pixels(image, width: int, height: int) -> np.ndarray:
    """RGB picture -> (1, 3, H, W) float32 in [-1, 1] at the request size (Lanczos resize when it differs:
    diffusers' VaeImageProcessor.preprocess)."""
    from PIL import Image
    rgb = image.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray((array * 2 - 1).transpose(2, 0, 1)[None])


def mask_pixels(image, width: int, height: int) -> np.ndarray:
    """Mask picture -> (1, 1, H, W) float32 {0, 1} (grey, Lanczos resize when the size differs, >= 0.5 -> 1:
    diffusers' mask_processor with do_binarize and do_convert_grayscale)."""
    from PIL import Image
    grey = image.convert("L")
    if grey.size != (width, height):
        grey = grey.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(grey, dtype=np.float32) / np.float32(255.0)
    return (array >= 0.5).astype(np.float32)[None, None]


def default_size(value: int, limits) -> int:
    """A picture's side as the request size: rounded down to the image step, at least the profile's min."""
    return max(limits.min_image, value // limits.image_step * limits.image_step)


def read_edit(image_in, mask_in, strength: float | None, width: int | None, height: int | None, limits,
              default_strength: float) -> tuple[EditInput, int, int]:
    """Decode IMAGE_IN (and MASK_IN) and check STRENGTH; returns the edit and the request's (width, height):
    the request's WIDTH/HEIGHT when sent, else the picture's size rounded down to the image step."""
    if image_in is None:
        if mask_in is not None or strength is not None:
            raise RequestError(f"{'MASK_IN' if mask_in is not None else 'STRENGTH'} needs IMAGE_IN: send the "
                               f"picture to edit too")
        raise ValueError("read_edit needs IMAGE_IN")
    strength = default_strength if strength is None else float(strength)
    if not (0.0 < strength <= 1.0):
        raise RequestError(f"STRENGTH {strength} is out of range; use 0 < STRENGTH <= 1 (how much of the picture "
                           f"is redrawn: 0.3 keeps it close, 1 redraws all)")
    image = decode_picture(image_in, "IMAGE_IN")
    width = default_size(image.size[0], limits) if width is None else width
    height = default_size(image.size[1], limits) if height is None else height
    from toonark.tiling import check_size
    try:   # before resizing to it: a huge WIDTH must not allocate anything
        check_size(limits, limits.min_batch, height, width)
    except ValueError as err:
        raise RequestError(str(err)) from None
    mask = None
    if mask_in is not None:
        mask_image = decode_picture(mask_in, "MASK_IN")
        if mask_image.size != image.size:
            raise RequestError(f"MASK_IN is {mask_image.size[0]}x{mask_image.size[1]} but IMAGE_IN is "
                               f"{image.size[0]}x{image.size[1]}; send a mask of the picture's size (white = "
                               f"repaint, black = keep)")
        mask = mask_pixels(mask_image, width, height)
    return EditInput(pixels(image, width, height), mask, strength), width, height
