"""Fast image decode and drawing for the vision results (OpenCV, in place on one array: no PIL round trips).

Decode: a JPEG or PNG file whose end marker is intact is decoded by OpenCV (the same `imdecode` Ultralytics uses,
EXIF rotation honoured); anything else, or a truncated file, goes through PIL's strict decoder and its messages.
Drawing (when a result's image is first read, see `annotate`): boxes with 'class 0.87' labels kept inside the image
(above the box when there is room, else inside it, shifted left at the right edge), masks blended at 45 %, and a
top-k banner for classification.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from backends.vision.types import Box, DetectionError, DetectionResult, DetectorModel

PALETTE = ((255, 56, 56), (56, 56, 255), (255, 157, 151), (255, 112, 31), (72, 249, 10), (0, 194, 255))
MASK_ALPHA = 0.45
_END_MARKERS = {b"\xff\xd8": b"\xff\xd9", b"\x89P": b"IEND\xaeB`\x82"}  # JPEG SOI -> EOI, PNG magic -> IEND chunk


def colour(class_id: int, bgr: bool = False) -> tuple[int, int, int]:
    c = PALETTE[class_id % len(PALETTE)]
    return c[::-1] if bgr else c


def read_bgr(path: str | Path) -> np.ndarray:
    """BGR uint8 (H, W, 3) of an image file; DetectionError with the file name when it is not a usable image."""
    return decode_file(check_file(path))


def check_file(path: str | Path) -> Path:
    """The path, once its header says it is an image of at most 89 megapixels (cheap: nothing is decoded)."""
    from studio.safety import check_image_file

    try:
        check_image_file(path)
    except ValueError as e:
        raise DetectionError(str(e)) from None
    return Path(path)


def decode_file(path: Path) -> np.ndarray:
    """BGR uint8 of a file `check_file` passed: OpenCV when the file ends with its end marker, else PIL's strict
    decoder and its messages. OpenCV releases the GIL, so this can run on a worker thread meanwhile."""
    import cv2

    data = path.read_bytes()
    end = _END_MARKERS.get(data[:2])
    if end is not None and data.rstrip(b"\0").endswith(end):  # complete file: the fast decoder is safe to use
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is not None:
            return bgr
    return cv2.cvtColor(_pil_rgb(path), cv2.COLOR_RGB2BGR)


def _pil_rgb(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))  # phone photos: honour rotation
    except Image.DecompressionBombError:
        raise DetectionError(f"{path.name}: image is too large (over 89 megapixels); resize it.") from None
    except Exception as e:
        raise DetectionError(f"{path.name} is not a readable image (corrupt, truncated or not an image): {e}") from None


def array_rgb(image: Any) -> np.ndarray:
    """RGB uint8 (H, W, 3) from a numpy array (RGB, gray or RGBA); clear error otherwise."""
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise DetectionError("No image given: upload an image first.")
    arr = image
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DetectionError(f"Expected an RGB image, got an array of shape {arr.shape}.")
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255 if arr.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def load_bgr(image: Any) -> np.ndarray:
    """BGR uint8 from a file path or an RGB array: what Ultralytics' predictor reads."""
    import cv2

    if isinstance(image, str | Path):
        return read_bgr(image)
    return cv2.cvtColor(array_rgb(image), cv2.COLOR_RGB2BGR)


def _font(img: np.ndarray) -> tuple[float, int]:
    scale = max(0.4, min(img.shape[:2]) / 1100)
    return scale, max(1, round(scale * 2))


def draw_label(img: np.ndarray, text: str, x: float, y: float, fill: tuple[int, int, int], *, above: bool) -> None:
    """A filled label with white text at (x, y), moved so it stays inside the image."""
    import cv2

    scale, thick = _font(img)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    w, h = tw + 6, th + base + 6
    x0 = int(min(max(0.0, x), max(0.0, img.shape[1] - w)))
    y0 = int(y - h if above and y - h >= 0 else min(max(0.0, y), img.shape[0] - h))
    cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), fill, -1)
    cv2.putText(img, text, (x0 + 3, y0 + 3 + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)


def draw_boxes(rgb: np.ndarray, boxes: list[Box], *, bgr: bool = False) -> np.ndarray:
    """Boxes and labels drawn in place on `rgb` (a writable uint8 array, RGB or with `bgr` BGR), returned."""
    import cv2

    line = max(2, round(min(rgb.shape[:2]) / 300))
    for b in boxes:
        c = colour(b.class_id, bgr)
        cv2.rectangle(rgb, (round(b.x1), round(b.y1)), (round(b.x2), round(b.y2)), c, line)
        draw_label(rgb, f"{b.name} {b.confidence:.2f}", b.x1, b.y1, c, above=True)
    return rgb


def draw_masks(rgb: np.ndarray, masks: np.ndarray, class_ids: list[int], *, bgr: bool = False) -> np.ndarray:
    """Blend (N, H, W) boolean masks (image resolution) into `rgb` in place, one colour per class."""
    if not len(masks):
        return rgb
    overlay = rgb.copy()
    for mask, k in zip(masks, class_ids, strict=True):
        overlay[mask] = colour(k, bgr)
    blended = (rgb * (1 - MASK_ALPHA) + overlay * MASK_ALPHA).astype(np.uint8)
    any_mask = masks.any(axis=0)
    rgb[any_mask] = blended[any_mask]
    return rgb


def draw_topk(rgb: np.ndarray, top: list[tuple[str, float]], *, bgr: bool = False) -> np.ndarray:
    """The top classes as stacked labels in the top-left corner, in place."""
    scale, thick = _font(rgb)
    import cv2

    y = 0.0
    for i, (name, p) in enumerate(top):
        draw_label(rgb, f"{i + 1}. {name} {p:.2f}", 0, y, colour(0, bgr) if i == 0 else (60, 60, 60), above=False)
        (_, th), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        y += th + base + 8
    return rgb


def result_from(res: Any, entry: DetectorModel, ms: float, top_k: int = 5) -> DetectionResult:
    """Boxes (and the mask count, or the top classes) of one Ultralytics result, read now; the annotated image is
    drawn when the result's `image` is first read, in place on the result's BGR frame (the array `detect` decoded
    for it, so nothing else sees it)."""
    names = res.names
    boxes = []
    if res.boxes is not None and len(res.boxes):
        data = res.boxes.data.cpu().numpy().astype(float)  # (N, 6): x1 y1 x2 y2 conf cls, one device copy
        for x1, y1, x2, y2, c, k in data[:, :6]:
            boxes.append(Box(int(k), str(names[int(k)]), float(c), float(x1), float(y1), float(x2), float(y2)))
    h, w = res.orig_shape
    seg = getattr(res, "masks", None)
    seg = seg if seg is not None and len(seg) else None
    top = []
    if getattr(res, "probs", None) is not None:
        probs = res.probs.data.float().cpu().numpy()
        order = np.argsort(-probs)[:top_k]
        top = [(str(names[int(i)]), float(probs[i])) for i in order]
    draw = partial(annotate, res.orig_img, boxes, seg, top)
    return DetectionResult(boxes, int(w), int(h), entry.id, ms, task=entry.task, masks=len(seg) if seg else 0,
                           top=top, draw=draw)  # fmt: skip


def annotate(frame: np.ndarray, boxes: list[Box], seg: Any, top: list[tuple[str, float]]) -> np.ndarray:
    """Masks (Ultralytics' Masks, or None), the top-k banner and the boxes drawn on the BGR frame (in place when it
    is writable); returns an RGB view of it (no copy of the full image)."""
    if not frame.flags.writeable:
        frame = frame.copy()
    if seg is not None:
        polygons = seg.xy  # image coordinates, one (K, 2) array per box
        draw_masks(frame, polygon_masks(polygons, frame.shape[:2]), [b.class_id for b in boxes], bgr=True)
    if top:
        draw_topk(frame, top, bgr=True)
    draw_boxes(frame, boxes, bgr=True)
    return frame[..., ::-1]


def polygon_masks(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """(N, H, W) boolean masks filled from image-coordinate polygons."""
    import cv2

    out = np.zeros((len(polygons), *shape), np.uint8)
    for i, poly in enumerate(polygons):
        if len(poly) >= 3:
            cv2.fillPoly(out[i], [np.round(poly).astype(np.int32)], 1)
    return out.astype(bool)
