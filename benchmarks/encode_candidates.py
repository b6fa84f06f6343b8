"""Image encoders for the postprocess step (issue 12: <= 10 ms for a 512x512 PNG), timed on three images.

    python benchmarks/encode_candidates.py [--size 512] [--reps 15] [--json out.json]

Images (uint8 RGB, HxWx3): `noise` (uniform random: the worst case, what random-weight builds produce),
`cartoon` (flat pastel regions, dark outlines, soft shading and a little grain: the kids' style the
service draws), `smooth` (gradients plus low-amplitude texture: a photo-like picture). Every output is
decoded again with Pillow and must give the same pixels (PNG, lossless WebP) or at least 30 dB PSNR
(lossy WebP), so only valid files are counted. Candidates whose package is not installed are listed
as skipped: Pillow is in the main venv; fpng, fpng-py, imagecodecs and opencv-python-headless are
optional (pip install them into a scratch venv to compare).
Medians of --reps calls after 2 warm-ups, single thread (the machine may be shared: compare rows).
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def images(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    # Cartoon: pastel background, a few flat shapes with dark outlines, soft shading, light grain.
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = (250, 244, 236)
    shapes = [((0.5, 0.55), (0.30, 0.26), (247, 190, 150)), ((0.38, 0.42), (0.07, 0.08), (255, 255, 255)),
              ((0.62, 0.42), (0.07, 0.08), (255, 255, 255)), ((0.5, 0.62), (0.10, 0.05), (240, 120, 140)),
              ((0.25, 0.2), (0.12, 0.10), (170, 210, 240)), ((0.8, 0.82), (0.15, 0.09), (160, 220, 170))]
    for (cy, cx), (ry, rx), color in shapes:
        d = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
        inside = d <= 1.0
        shade = 1.0 - 0.15 * np.clip(d, 0, 1)          # soft shading towards the rim
        canvas[inside] = np.array(color, np.float32) * shade[inside, None]
        canvas[(d > 1.0) & (d <= 1.0 + 0.08 / max(ry, rx))] = (60, 45, 40)   # outline
    cartoon = np.clip(canvas + rng.normal(0, 1.5, canvas.shape), 0, 255).astype(np.uint8)
    smooth = np.stack([120 + 100 * np.sin(3 * x + 1), 110 + 90 * np.cos(2 * y), 140 + 80 * np.sin(2 * (x + y))], -1)
    smooth = np.clip(smooth + rng.normal(0, 4, smooth.shape), 0, 255).astype(np.uint8)
    return {"noise": noise, "cartoon": cartoon, "smooth": smooth}


def pillow(fmt: str, **options):
    from PIL import Image

    def encode(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format=fmt, **options)
        return buffer.getvalue()
    return encode


def candidates() -> tuple[dict, list[str]]:
    out, skipped = {}, []
    # Pillow PNG: zlib level x strategy (compress_type: 0 default, 1 filtered, 2 huffman only, 3 RLE, 4 fixed).
    for level in (0, 1, 3, 6):
        out[f"pillow png level {level}"] = ("png", pillow("PNG", compress_level=level, optimize=False))
    for ctype, name in ((1, "filtered"), (2, "huffman"), (3, "rle")):
        out[f"pillow png level 1 {name}"] = ("png", pillow("PNG", compress_level=1, compress_type=ctype))
    out["pillow png level 6 (served today)"] = out.pop("pillow png level 6")
    for method in (0, 4, 6):
        out[f"pillow webp q90 method {method}"] = ("webp-lossy", pillow("WEBP", quality=90, method=method))
    for method in (0, 1):
        out[f"pillow webp lossless method {method}"] = ("webp", pillow("WEBP", lossless=True, quality=0,
                                                                        method=method))
    try:
        import fpng
        out["fpng (fpng 0.1.0)"] = ("png", fpng.from_ndarray)
    except ImportError:
        skipped.append("fpng")
    try:
        import fpng_py

        def fpng_py_encode(image: np.ndarray, flags=0) -> bytes:
            h, w, c = image.shape
            return bytes(fpng_py.fpng_encode_image_to_memory(np.ascontiguousarray(image).tobytes(), w, h, c, flags))
        out["fpng-py"] = ("png", fpng_py_encode)
        out["fpng-py slower"] = ("png", lambda image: fpng_py_encode(image, fpng_py.CompressionFlags.FPNG_ENCODE_SLOWER))
    except ImportError:
        skipped.append("fpng-py")
    try:
        import imagecodecs
        out["imagecodecs png level 1 rle sub"] = ("png", lambda im: bytes(imagecodecs.png_encode(im, level=1, strategy=3,
                                                                                              filter=16)))
        out["imagecodecs spng level 1"] = ("png", lambda im: bytes(imagecodecs.spng_encode(im, level=1)))
        out["imagecodecs webp lossless method 0"] = ("webp", lambda im: bytes(imagecodecs.webp_encode(
            im, level=0, lossless=True, method=0)))
    except ImportError:
        skipped.append("imagecodecs")
    try:
        import cv2
        cv2.setNumThreads(1)
        out["opencv png level 1"] = ("png", lambda im: cv2.imencode(".png", im[..., ::-1],
                                                                     [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes())
    except ImportError:
        skipped.append("opencv-python-headless")
    return out, skipped


def check(kind: str, data: bytes, image: np.ndarray) -> float | None:
    """Decode with Pillow; lossless kinds must round-trip exactly. Returns PSNR for lossy WebP."""
    from PIL import Image
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    expected_magic = b"\x89PNG" if kind == "png" else b"RIFF"
    if not data.startswith(expected_magic) or decoded.shape != image.shape:
        raise ValueError("not a valid file of the expected format")
    if kind in ("png", "webp"):
        if not np.array_equal(decoded, image):
            raise ValueError("lossless output decodes to other pixels")
        return None
    mse = float(np.mean((decoded.astype(np.float64) - image) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    pictures = images(args.size)
    encoders, skipped = candidates()
    rows = []
    for name, (kind, encode) in encoders.items():
        row = {"encoder": name, "kind": kind}
        for label, image in pictures.items():
            for _ in range(2):
                data = encode(image)
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                data = encode(image)
                times.append((time.perf_counter() - start) * 1e3)
            psnr = check(kind, data, image)
            row[label] = {"ms": round(statistics.median(times), 2), "kb": round(len(data) / 1024, 1),
                          **({"psnr_db": round(psnr, 1)} if psnr is not None else {})}
        rows.append(row)
    print(f"{'encoder':<36}" + "".join(f"{label + ' ms':>12}{'KB':>8}" for label in pictures))
    for row in rows:
        print(f"{row['encoder']:<36}" + "".join(f"{row[label]['ms']:>12.2f}{row[label]['kb']:>8.0f}" for label in pictures))
    if skipped:
        print("skipped (not installed): " + ", ".join(skipped))
    result = {"size": args.size, "reps": args.reps, "rows": rows, "skipped": skipped,
              "note": "medians of single-thread calls; lossless rows round-trip exactly, lossy WebP rows carry PSNR"}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
