"""Video detection: read frames with OpenCV, detect every `stride`-th frame, write an annotated WebM (VP8).

Frames between detected ones carry the last boxes, so the output keeps the input's length and frame rate.
Detection runs in chunks (one residency lease per chunk), and progress is yielded after each chunk, so the UI
can stream it and a cancel (closing the generator) stops within one chunk; the writer is closed either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from studio.safety import atomic_write_json, safe_filename, unguessable_stamp

log = logging.getLogger(__name__)

MAX_FRAMES = 200_000  # about 2 hours at 25 fps


def _open(path: Path) -> tuple[Any, float, int, int, int]:
    import cv2

    from backends.vision.types import DetectionError

    if not path.is_file():
        raise DetectionError(f"Video not found: {path}")
    cap = cv2.VideoCapture(str(path))
    ok, first = cap.read() if cap.isOpened() else (False, None)
    if not ok or first is None:
        cap.release()
        raise DetectionError(f"{path.name} is not a readable video (unsupported codec, corrupt, or not a video).")
    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    fps = fps if 1.0 <= fps <= 240.0 else 25.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    if total > MAX_FRAMES:
        cap.release()
        raise DetectionError(f"{path.name} has {total} frames; the limit is {MAX_FRAMES}. Cut it into parts.")
    h, w = first.shape[:2]
    return cap, fps, total, w, h


def _writer(out: Path, fps: float, w: int, h: int) -> Any:
    import cv2

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"VP80"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write VP8/WebM video to {out}")
    return writer


def _boxes_json(res: Any) -> list[dict[str, Any]]:
    if res.boxes is None or not len(res.boxes):
        return []
    names = res.names
    out = []
    for xyxy, c, k in zip(res.boxes.xyxy.tolist(), res.boxes.conf.tolist(), res.boxes.cls.tolist(), strict=True):
        out.append({"class": names[int(k)], "confidence": round(c, 4), "xyxy": [round(v, 1) for v in xyxy]})
    return out


def annotate_video(
    path: Path,
    out_dir: Path,
    predict: Callable[[list[np.ndarray]], list[Any]],
    *,
    stride: int = 1,
    chunk: int = 16,
) -> Iterator[Any]:
    """Yield VideoProgress after each chunk; the last one has `output` (WebM) and `json_path` set."""
    import cv2

    from backends.vision.types import DetectionError, VideoProgress

    if stride < 1 or chunk < 1:
        raise DetectionError(f"frame stride and chunk must be >= 1, got {stride} and {chunk}")
    cap, fps, total, w, h = _open(path)
    stamp = unguessable_stamp()  # the file route serves outputs/: another user must not guess the name
    out = out_dir / f"{safe_filename(path.stem, 'video')}-{stamp}.webm"
    writer = _writer(out, fps, w, h)
    progress = VideoProgress(0, total, 0, 0)
    last_res: Any = None
    try:
        while True:
            frames = []
            while len(frames) < chunk:
                ok, bgr = cap.read()
                if not ok:
                    break
                frames.append(bgr)
            if not frames:
                break
            start = progress.frames_read
            picked = [i for i in range(len(frames)) if (start + i) % stride == 0]
            results = predict([cv2.cvtColor(frames[i], cv2.COLOR_BGR2RGB) for i in picked]) if picked else []
            by_index = dict(zip(picked, results, strict=True))
            for i, bgr in enumerate(frames):
                if i in by_index:
                    last_res = by_index[i]
                    boxes = _boxes_json(last_res)
                    progress.per_frame.append(
                        {"frame": start + i, "time_s": round((start + i) / fps, 3), "boxes": boxes}
                    )
                    progress.frames_detected += 1
                    progress.boxes += len(boxes)
                writer.write(_draw(bgr, last_res) if last_res is not None else bgr)
            progress.frames_read += len(frames)
            yield replace(progress)  # a snapshot: the caller may keep it
    finally:
        cap.release()
        writer.release()
    json_path = out.with_suffix(".json")
    atomic_write_json(json_path, {"video": path.name, "fps": fps, "stride": stride, "frames": progress.per_frame})
    progress.output, progress.json_path = out, json_path
    log.info(
        "annotated %s: %d frames, %d detected, %d boxes -> %s",
        path.name,
        progress.frames_read,
        progress.frames_detected,
        progress.boxes,
        out,
    )
    yield progress


def _draw(bgr: np.ndarray, res: Any) -> np.ndarray:
    """The boxes of `res` drawn on `bgr` (which may be a later frame than the one `res` was computed on)."""
    import cv2

    img = bgr.copy()
    if res.boxes is None:
        return img
    names = res.names
    for (x1, y1, x2, y2), c, k in zip(
        res.boxes.xyxy.tolist(), res.boxes.conf.tolist(), res.boxes.cls.tolist(), strict=True
    ):
        colour = _colour(int(k))
        cv2.rectangle(img, (int(x1), int(y1)), (int(x2), int(y2)), colour, 2)
        cv2.putText(
            img,
            f"{names[int(k)]} {c:.2f}",
            (int(x1), max(12, int(y1) - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            colour,
            1,
            cv2.LINE_AA,
        )
    return img


def _colour(k: int) -> tuple[int, int, int]:
    palette = ((56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72))
    return palette[k % len(palette)]
