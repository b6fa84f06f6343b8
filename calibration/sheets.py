"""Contact sheets a person can look at: a grid of the evaluation images, and reference vs INT8."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from toonark.files import atomic_file

GAP = 4
BACKGROUND = (255, 255, 255)


def _labelled_row(label: str, height: int):
    from PIL import Image, ImageDraw
    tile = Image.new("RGB", (96, height), BACKGROUND)
    ImageDraw.Draw(tile).text((4, max(0, height // 2 - 6)), label, fill=(0, 0, 0))
    return tile


def grid(images: list[np.ndarray], columns: int | None = None, row_labels: list[str] | None = None):
    """uint8 HWC images (same size) -> one PIL image, row-major, GAP pixels apart."""
    from PIL import Image
    if not images:
        raise ValueError("no images for the contact sheet")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"contact-sheet images differ in size: {sorted(shapes)}")
    height, width = images[0].shape[:2]
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    margin = 96 if row_labels else 0
    sheet = Image.new("RGB", (margin + columns * (width + GAP) + GAP, rows * (height + GAP) + GAP), BACKGROUND)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        sheet.paste(Image.fromarray(np.asarray(image, dtype=np.uint8)),
                    (margin + GAP + column * (width + GAP), GAP + row * (height + GAP)))
    for row, label in enumerate(row_labels or []):
        sheet.paste(_labelled_row(label, height), (0, GAP + row * (height + GAP)))
    return sheet


def save_png(image, path: Path) -> Path:
    with atomic_file(path) as handle:
        image.save(handle, format="PNG")
    return Path(path)


def write_sheets(folder: Path, reference: list[np.ndarray], int8: list[np.ndarray], reference_label: str
                 ) -> dict[str, str]:
    """reference.png (the evaluation prompts' reference images) and compare.png (reference row, INT8 row,
    |difference| x4 row). Returns {sheet: file name}."""
    folder = Path(folder)
    save_png(grid(reference), folder / "reference.png")
    diff = [np.clip(np.abs(r.astype(np.int16) - q.astype(np.int16)) * 4, 0, 255).astype(np.uint8)
            for r, q in zip(reference, int8)]
    save_png(grid(list(reference) + list(int8) + diff, columns=len(reference),
                  row_labels=[reference_label, "int8", "|diff| x4"]), folder / "compare.png")
    return {"reference": "reference.png", "compare": "compare.png"}
