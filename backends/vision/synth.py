"""Synthetic YOLO datasets: coloured shapes on textured backgrounds with exact labels (tests and benchmarks).

Backgrounds are coarse colour noise plus stripes and grain, so a detector has to learn shape, not "anything that
differs from a flat background". Objects are placed with little overlap so every label is visible.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

SYNTH_SHAPES = ("circle", "square", "triangle")


# ---- synthetic data --------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured clutter: coarse colour noise upsampled, plus stripes and fine grain; (H, W, 3) uint8."""
    coarse = rng.integers(40, 200, size=(6, 6, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)[..., None] * 18
    grain = rng.normal(0, 10, size=(size, size, 1))
    return np.clip(img + stripes + grain, 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:  # triangle: apex at top centre; its bounding box is exactly `box`
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _polygon(shape: str, box: tuple[int, int, int, int], size: int) -> list[float]:
    """The outline of a drawn shape, normalised (x1 y1 x2 y2 ...): 24 points for a circle."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        pts = np.stack([(x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(t), (y0 + y1) / 2 + (y1 - y0) / 2 * np.sin(t)], 1)
    elif shape == "square":
        pts = np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], float)
    else:
        pts = np.array([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], float)
    return [float(v) for v in np.clip(pts / size, 0, 1).reshape(-1)]


POOL_FROM = 320  # from this size on, backgrounds come from a pool of 8 (a texture per image costs more than training)


def _synthetic_image(
    rng: np.random.Generator,
    size: int,
    max_objects: int,
    shapes: tuple[str, ...],
    polygons: bool = False,
    pool: list[np.ndarray] | None = None,
):
    if pool:
        bg = pool[int(rng.integers(len(pool)))]
        im = Image.fromarray(np.ascontiguousarray(bg[:, ::-1] if rng.integers(2) else bg))
    else:
        im = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(im)
    labels, placed = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):  # place without heavy overlap so every label is visible
            side = int(rng.integers(size // 6, size // 3))
            x0, y0 = (int(v) for v in rng.integers(0, size - side, size=2))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_iou(box, b) < 0.1 for b in placed):
                break
        else:
            continue
        cls = int(rng.integers(len(shapes)))
        colour = tuple(int(c) for c in rng.choice([30, 230], size=3))
        _draw_shape(draw, shapes[cls], box, colour)
        placed.append(box)
        cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
        if polygons:
            labels.append(f"{cls} " + " ".join(f"{v:.6f}" for v in _polygon(shapes[cls], box, size)))
        else:
            labels.append(f"{cls} {cx:.6f} {cy:.6f} {side / size:.6f} {side / size:.6f}")
    return im, labels


def _iou(a: tuple, b: tuple) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def make_synthetic_dataset(
    root: Path,
    *,
    n_train: int = 64,
    n_val: int = 16,
    imgsz: int = 160,
    max_objects: int = 3,
    shapes: tuple[str, ...] = SYNTH_SHAPES,
    seed: int = 0,
    polygons: bool = False,
    suffix: str = ".png",
) -> Path:
    """Coloured circles/squares/triangles on textured backgrounds with exact YOLO labels (boxes, or outlines for
    segmentation with `polygons`); returns data.yaml."""
    if n_train < 1 or n_val < 1 or imgsz < 32 or max_objects < 1:
        raise ValueError(f"need n_train, n_val, max_objects >= 1 and imgsz >= 32; got {n_train}, {n_val}, {imgsz}")
    unknown = set(shapes) - set(SYNTH_SHAPES)
    if unknown:
        raise ValueError(f"unknown shapes {sorted(unknown)}; choose from {SYNTH_SHAPES}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    pool = [_background(rng, imgsz) for _ in range(8)] if imgsz >= POOL_FROM else None
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            im, labels = _synthetic_image(rng, imgsz, max_objects, shapes, polygons, pool)
            im.save(root / "images" / split / f"{i:05d}{suffix}", **({"quality": 92} if suffix == ".jpg" else {}))
            (root / "labels" / split / f"{i:05d}.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    data = {"path": ".", "train": "images/train", "val": "images/val", "names": dict(enumerate(shapes))}
    yaml_path = root / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    log.info("synthetic dataset: %d train + %d val images of %dpx in %s", n_train, n_val, imgsz, root)
    return yaml_path


def make_synthetic_cls_dataset(
    root: Path,
    *,
    n_train: int = 16,
    n_val: int = 6,
    imgsz: int = 64,
    shapes: tuple[str, ...] = SYNTH_SHAPES,
    seed: int = 0,
) -> Path:
    """Ultralytics' classification layout: root/{train,val}/<shape>/*.png, one centred shape per image (n_* per
    class); returns root."""
    if n_train < 1 or n_val < 1 or imgsz < 32:
        raise ValueError(f"need n_train, n_val >= 1 and imgsz >= 32; got {n_train}, {n_val}, {imgsz}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        for shape in shapes:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                im = Image.fromarray(_background(rng, imgsz))
                side = int(rng.integers(imgsz // 2, imgsz - 4))
                x0, y0 = (int(v) for v in rng.integers(0, imgsz - side, size=2))
                colour = tuple(int(c) for c in rng.choice([30, 230], size=3))
                _draw_shape(ImageDraw.Draw(im), shape, (x0, y0, x0 + side, y0 + side), colour)
                im.save(folder / f"{i:04d}.png")
    log.info("synthetic classification set: %d+%d images per class in %s", n_train, n_val, root)
    return root
