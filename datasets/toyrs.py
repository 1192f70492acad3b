"""ToyRS: a tiny procedurally drawn aerial-scene dataset for smoke runs and tests (pure: no Dassl import).

Eight visually distinct classes (the ``ToyRS`` row of :data:`datasets.catalog.CATALOG`), drawn with
numpy and Pillow from a seeded generator per image, so the same arguments always give the same pixels.
``python -m tools.prepare_data toyrs --root DATA`` writes ``DATA/ToyRS/images/<class>/<class>_NNN.png``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from datasets.catalog import CATALOG

logger = logging.getLogger(__name__)

PER_CLASS = 60
SIZE = 64
SEED = 0

Painter = Callable[[np.random.Generator, int], Image.Image]


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 18) -> tuple[int, int, int]:
    r, g, b = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)
    return r, g, b


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    coarse = rng.uniform(-amplitude, amplitude, (cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    return np.asarray(img)


def _canvas(rng: np.random.Generator, size: int, base: tuple[int, int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (size, size), _jitter(rng, base))
    return img, ImageDraw.Draw(img)


def _farmland(rng: np.random.Generator, s: int) -> Image.Image:
    crops = [(92, 140, 52), (170, 160, 70), (130, 100, 60), (60, 110, 45), (200, 185, 110)]
    img, draw = _canvas(rng, s, (120, 110, 70))
    y = 0
    while y < s:
        h = int(rng.integers(s // 6, s // 3))
        x = 0
        while x < s:
            w = int(rng.integers(s // 5, s // 2))
            colour = _jitter(rng, crops[int(rng.integers(len(crops)))])
            draw.rectangle([x + 1, y + 1, x + w - 2, y + h - 2], fill=colour)
            dark = tuple(max(c - 25, 0) for c in colour)
            for yy in range(y + 3, y + h - 2, 4):  # crop rows
                draw.line([x + 2, yy, x + w - 3, yy], fill=dark, width=1)
            x += w
        y += h
    return img


def _water(rng: np.random.Generator, s: int) -> Image.Image:
    img, draw = _canvas(rng, s, (28, 70, 120))
    for _ in range(int(rng.integers(10, 25))):  # wave glints
        x, y = int(rng.integers(s)), int(rng.integers(s))
        length = int(rng.integers(3, 9))
        draw.line([x, y, x + length, y], fill=_jitter(rng, (90, 140, 180), 15), width=1)
    return img


def _road(rng: np.random.Generator, s: int) -> Image.Image:
    img, draw = _canvas(rng, s, (95, 125, 70))
    for _ in range(int(rng.integers(1, 3))):
        width = int(rng.integers(s // 9, s // 6))
        angle = rng.uniform(0, math.pi)
        dx, dy = math.cos(angle), math.sin(angle)
        cx, cy = rng.uniform(s / 3, 2 * s / 3), rng.uniform(s / 3, 2 * s / 3)
        ends = [(cx - s * dx, cy - s * dy), (cx + s * dx, cy + s * dy)]
        draw.line(ends, fill=_jitter(rng, (110, 110, 110), 10), width=width)
        for t in range(-s, s, 10):  # dashed centre line
            draw.line([(cx + t * dx, cy + t * dy), (cx + (t + 5) * dx, cy + (t + 5) * dy)], fill=(235, 225, 120))
    return img


def _buildings(rng: np.random.Generator, s: int) -> Image.Image:
    roofs = [(170, 70, 60), (150, 150, 150), (210, 205, 195), (120, 90, 70), (90, 100, 120)]
    img, draw = _canvas(rng, s, (80, 80, 85))  # streets
    step = int(rng.integers(s // 6, s // 4))
    for y in range(2, s, step):
        for x in range(2, s, step):
            w, h = int(rng.integers(step // 2, step - 2)), int(rng.integers(step // 2, step - 2))
            draw.rectangle([x + 2, y + 2, x + w + 2, y + h + 2], fill=(40, 40, 45))  # shadow
            draw.rectangle([x, y, x + w, y + h], fill=_jitter(rng, roofs[int(rng.integers(len(roofs)))]))
    return img


def _forest(rng: np.random.Generator, s: int) -> Image.Image:
    img, draw = _canvas(rng, s, (30, 60, 30))
    n = s * s // 60
    xs, ys = rng.integers(0, s, n), rng.integers(0, s, n)
    radii = rng.integers(s // 32 + 2, s // 12 + 3, n)
    colours = np.clip(np.array([45, 95, 40]) + rng.integers(-22, 23, (n, 3)), 0, 255)
    for x, y, r, colour in zip(xs.tolist(), ys.tolist(), radii.tolist(), colours.tolist()):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(colour))
    return img


def _desert(rng: np.random.Generator, s: int) -> Image.Image:
    base = np.array(_jitter(rng, (214, 184, 130), 12), dtype=np.float32)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    freq = rng.uniform(3.0, 6.0) * 2 * math.pi / s
    phase = rng.uniform(0, 2 * math.pi)
    dunes = np.sin(freq * (xx + 0.35 * yy) + phase + 0.6 * np.sin(yy * freq / 2))
    shade = 22 * dunes + _smooth_noise(rng, s, 4, 12)
    arr = base[None, None, :] + shade[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _parking_lot(rng: np.random.Generator, s: int) -> Image.Image:
    cars = [(200, 30, 30), (230, 230, 230), (30, 60, 160), (20, 20, 20), (200, 180, 40), (120, 120, 130)]
    img, draw = _canvas(rng, s, (70, 70, 72))
    slot_w, slot_h = max(s // 12, 4), max(s // 6, 8)
    for row_y in range(slot_h // 2, s - slot_h, slot_h + slot_h // 2):
        for x in range(0, s, slot_w):
            draw.line([x, row_y, x, row_y + slot_h], fill=(235, 235, 235), width=1)
            if rng.random() < 0.7:
                draw.rectangle(
                    [x + 2, row_y + 2, x + slot_w - 2, row_y + slot_h - 2],
                    fill=_jitter(rng, cars[int(rng.integers(len(cars)))], 10),
                )
    return img


def _river(rng: np.random.Generator, s: int) -> Image.Image:
    img, draw = _canvas(rng, s, (90, 130, 70))
    amplitude, freq = rng.uniform(s / 10, s / 5), rng.uniform(1.0, 2.5) * 2 * math.pi / s
    phase, width = rng.uniform(0, 2 * math.pi), rng.uniform(s / 10, s / 6)
    centre = [(s / 2 + amplitude * math.sin(freq * y + phase), y) for y in range(-2, s + 3, 2)]
    draw.line(centre, fill=(194, 178, 128), width=int(width * 1.6), joint="curve")  # sandy banks
    draw.line(centre, fill=_jitter(rng, (45, 90, 140), 15), width=int(width), joint="curve")
    return img


PAINTERS: dict[str, Painter] = {
    "farmland": _farmland,
    "water": _water,
    "road": _road,
    "buildings": _buildings,
    "forest": _forest,
    "desert": _desert,
    "parking_lot": _parking_lot,
    "river": _river,
}


def draw_scene(classname: str, index: int, size: int = SIZE, seed: int = SEED) -> Image.Image:
    """Draw image ``index`` of ``classname``: RGB, ``size`` x ``size``, fully determined by the arguments."""
    if classname not in PAINTERS:
        raise ValueError(f"ToyRS has no class {classname!r}; classes: {', '.join(PAINTERS)}.")
    class_index = list(PAINTERS).index(classname)
    rng = np.random.default_rng([seed, class_index, index])
    canvas = size * 3 // 2  # room to rotate without empty corners, then crop the centre
    img = PAINTERS[classname](rng, canvas)
    img = img.rotate(float(rng.choice([0, 90, 180, 270])) + float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
    offset = (canvas - size) // 2
    img = img.crop((offset, offset, offset + size, offset + size))
    arr = np.asarray(img, dtype=np.float32)
    light = rng.uniform(0.85, 1.15)  # illumination and sensor noise
    arr = arr * light + rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)


def generate(
    image_dir: str | Path, per_class: int = PER_CLASS, size: int = SIZE, seed: int = SEED, progress: bool = True
) -> int:
    """Write ToyRS to ``image_dir/<class>/<class>_NNN.png`` and return the number of images.

    The images are built in ``<image_dir>.partial`` and renamed at the end, so an interrupted run never
    leaves a folder that looks complete. An existing ``image_dir`` is an error (nothing is overwritten).
    """
    image_dir = Path(image_dir)
    if image_dir.exists():
        raise FileExistsError(f"{image_dir} already exists; remove it to generate ToyRS again.")
    if per_class < 1 or size < 16:
        raise ValueError(f"per_class must be >= 1 and size >= 16 (got per_class={per_class}, size={size}).")
    classnames = CATALOG["ToyRS"].classnames
    partial = image_dir.with_name(image_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    jobs = [(cls, i) for cls in classnames for i in range(per_class)]
    for cls in classnames:
        (partial / cls).mkdir(parents=True)
    for cls, i in tqdm(jobs, desc="ToyRS", unit="img", disable=not progress):
        draw_scene(cls, i, size, seed).save(partial / cls / f"{cls}_{i:03d}.png", optimize=False)
    os.replace(partial, image_dir)
    logger.info("Generated %d ToyRS images (%d classes, %d px) in %s", len(jobs), len(classnames), size, image_dir)
    return len(jobs)
