"""Path containment, safe weight loading, atomic writes and upload limits.

Invariants: a user-given name never resolves outside its base folder; weights load from safetensors, and
pickles only through `torch.load(weights_only=True)`; every save is temp file + fsync + os.replace, so a crash
or a full disk leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_WINDOWS_ABS = re.compile(r"^[A-Za-z]:[\\/]")
TMP_SUFFIX = ".tmp"  # every temp file or folder of an atomic save: `.<name>.<random>.tmp`
_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


class UnsafePathError(ValueError):
    """A user-given name tried to leave its folder."""


class WeightsError(ValueError):
    """A weights file is missing, truncated, a git-LFS pointer, or not a safe format."""


def contained_path(base: Path, name: str) -> Path:
    """`base / name`, refusing absolute paths, drive letters, `..` and symlinks that lead out of `base`."""
    if not name or "\x00" in name:
        raise UnsafePathError(f"Invalid name {name!r}: it is empty or contains a null byte.")
    if os.path.isabs(name) or _WINDOWS_ABS.match(name) or name.startswith("\\"):
        raise UnsafePathError(f"Invalid name {name!r}: absolute paths are not allowed; give a plain name.")
    base_resolved = base.resolve()
    target = (base_resolved / name).resolve()
    if target != base_resolved and base_resolved not in target.parents:
        raise UnsafePathError(f"Invalid name {name!r}: it points outside {base}.")
    return target


def unguessable_stamp() -> str:
    """`20261201-101500-3f9c2a7e1b04`: sortable by time, but another user of the file route cannot guess it."""
    import secrets
    import time

    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(6)}"


def within(path: Path, root: Path) -> bool:
    """True when `path` (symlinks resolved) is `root` or inside it."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path == root or root in path.parents


def allowed_path(
    path: str | Path, roots: tuple[Path, ...], protected: tuple[Path, ...] = (), what: str = "path"
) -> Path:
    """The resolved `path` if it lies inside one of `roots` and neither is nor holds nor sits in a protected path.

    This is how a request names a server file: it may only pick among what the owner's settings allow."""
    raw = str(path or "").strip()
    if not raw or "\x00" in raw:
        raise UnsafePathError(f"Invalid {what} {raw!r}: it is empty or contains a null byte.")
    resolved = Path(os.path.expanduser(raw)).resolve()
    for p in protected:
        if within(resolved, p) or within(p, resolved):
            raise UnsafePathError(f"The {what} {raw!r} is not allowed: it holds the studio's models, cache or config.")
    if not any(within(resolved, r) for r in roots):
        listed = ", ".join(str(r) for r in roots) or "none"
        raise UnsafePathError(
            f"The {what} {raw!r} is outside the folders this studio allows ({listed}); the owner can add one in "
            "the settings."
        )
    return resolved


WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def safe_filename(name: str, default: str = "untitled") -> str:
    """A name usable as one path component: letters, digits, '-', '_', '.'; never '..' or hidden."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")[:120]
    if cleaned.split(".")[0].upper() in WINDOWS_RESERVED:  # CON, NUL.txt, ... name devices on Windows
        cleaned = "_" + cleaned
    return cleaned or default


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path` for a library that writes by file name (torch.save, ONNX export); on success
    fsync it and rename it over `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_writer(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside `path`; on success fsync and rename over it, on error delete the temp file."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


@contextlib.contextmanager
def atomic_folder(target: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside `target` to fill; on success rename it into place, on error delete it, so a
    half-written folder is never picked up. An existing `target` is replaced, or with `replace=False` kept (another
    process built the same folder first) and ours discarded."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX))
    try:
        yield tmp
        if target.exists():
            if not replace:
                return
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def check_weights_file(path: Path) -> None:
    """Refuse a missing file, an empty file or a git-LFS pointer before any loader sees it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"Weights file is empty: {path}")
    if size < 1024:
        with path.open("rb") as f:
            if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
                raise WeightsError(
                    f"{path} is a git-LFS pointer, not the weights: run `git lfs pull` or download the file again."
                )


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's tensors ({name: {"dtype", "shape"}}, plus "__metadata__"), read with safetensors' own
    parser, which also checks that the file holds every byte the header promises (catches truncation)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    check_weights_file(path)
    try:
        with safe_open(str(path), framework="np") as f:
            header: dict[str, Any] = {
                name: {"dtype": f.get_slice(name).get_dtype(), "shape": f.get_slice(name).get_shape()}
                for name in f.keys()  # noqa: SIM118 (safe_open is not a mapping)
            }
            header["__metadata__"] = f.metadata() or {}
    except SafetensorError as e:
        raise WeightsError(
            f"{path} is truncated or not a safetensors file ({e}); download or convert it again."
        ) from None
    return header


def safetensors_numel(path: Path) -> int:
    """Number of parameters in a safetensors file, read from its (checked) header only."""
    header = safetensors_header(path)
    return sum(math.prod(info["shape"]) for name, info in header.items() if name != "__metadata__")


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (tensors are made contiguous and moved to CPU)."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(Path(path), data)


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, Any]:
    """Load a safetensors file, turning a truncated or corrupt file into a WeightsError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_weights_file(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None


def load_torch_weights(path: Path, map_location: str = "cpu") -> Any:
    """torch.load with weights_only=True: a malicious pickle raises instead of running."""
    import pickle

    import torch

    check_weights_file(path)
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise WeightsError(
            f"{path} was refused: it is not a plain weights file (pickled code or corrupt data). "
            f"Convert it to safetensors. Detail: {str(e).splitlines()[0]}"
        ) from None


def check_upload_size(path: Path, max_bytes: int) -> None:
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise ValueError(f"Upload is {size / 2**20:.0f} MB; the limit is {max_bytes / 2**20:.0f} MB.")


def remove_orphan_temps(roots: list[Path], min_age_s: float = 60.0) -> list[Path]:
    """Delete temp files and folders of atomic saves that a crash left behind (`.<name>.<random>.tmp`).

    Only names our writers make are touched, and only ones older than `min_age_s` (a save in progress is young)."""
    import time

    removed: list[Path] = []
    now = time.time()
    for root in roots:
        if not Path(root).is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*filenames, *dirnames]:
                p = Path(dirpath) / name
                if not _TMP_NAME.match(name) or p.is_symlink():
                    continue
                try:
                    if now - p.lstat().st_mtime < min_age_s:
                        continue
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                except OSError:
                    continue
                removed.append(p)
            dirnames[:] = [d for d in dirnames if not _TMP_NAME.match(d)]
    return removed


MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (about 89 megapixels)


def check_image_file(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of an image file, read from its header; refuses non-images and images over `max_pixels`."""
    import warnings

    from PIL import Image

    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        raise ValueError(f"{name}: image is too large (over {max_pixels / 1e6:.0f} megapixels); resize it.") from None
    except Exception as e:
        raise ValueError(f"{name} is not a readable image (corrupt, truncated or not an image): {e}") from None
    if w * h > max_pixels:
        raise ValueError(
            f"{name}: image is {w}x{h} ({w * h / 1e6:.0f} megapixels); over {max_pixels / 1e6:.0f} megapixels are "
            "refused. Resize it."
        )
    return w, h


class ImageFileError(ValueError):
    """An image upload cannot be used: unreadable, truncated, not an image, or too large to open safely."""


def open_image(path: Path, *, what: str = "image", max_pixels: int = MAX_IMAGE_PIXELS, draft: int = 0) -> Any:
    """Decode an image file fully into memory, or raise ImageFileError naming `what` and the fix.

    The size is checked from the header against `max_pixels` (PIL's ~89 MP threshold by default) before decoding
    (a decompression bomb or a 20000x20000 upload never reaches memory); the whole file is decoded here, so a truncated file fails now and not halfway through a
    model; a zip or text file renamed .png is refused as "not an image". Animated images give their first frame
    (`.info["frames"]` says how many there were). `draft` > 0 lets JPEG decode at a reduced scale no smaller
    than that many pixels per side (cheap downscaling of huge photos). Returns a PIL image in its own mode.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    name = Path(str(path)).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(Path(path)) as im:
                w, h = im.size
                if w * h > max_pixels or w <= 0 or h <= 0:
                    raise ImageFileError(
                        f"The {what} ({name}) is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the "
                        f"{max_pixels / 1e6:.0f} MP limit: resize it (e.g. to 4000 px on the long side) and retry."
                    )
                frames = getattr(im, "n_frames", 1)
                if draft and im.format == "JPEG":
                    im.draft("RGB", (draft, draft))
                im.seek(0)
                im.load()
                image = im.copy()
    except ImageFileError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageFileError(
            f"The {what} ({name}) is too large to open safely (a decompression bomb?): resize it below "
            f"{max_pixels / 1e6:.0f} megapixels."
        ) from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError):
        raise ImageFileError(
            f"The {what} ({name}) is not a readable image (corrupt, truncated or not an image): upload a PNG or JPEG."
        ) from None
    image.info["frames"] = frames
    return image
