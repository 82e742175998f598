"""YOLO-format detection datasets: safe unzip and validation with file/line messages (synthetic data: yolo_synth).

Layout accepted (the usual Ultralytics one): a `data.yaml` with `names` (list or {id: name}) and `train`/`val`
folders of images, relative to `path` or to the yaml's folder. The label of `.../images/<x>.jpg` is
`.../labels/<x>.txt`, one `class x_center y_center width height` line per object, normalised to 0-1 (polygon
lines of 3+ points are accepted too). An image without a label file is an error; an EMPTY label file marks a
background image on purpose.

Policy: the user's data.yaml is only read, never handed to Ultralytics (its `download:` key may hold a script
that Ultralytics would run); `write_training_yaml` writes a clean one with path/train/val/names only.
No gradio and no torch here; Pillow and numpy only.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from studio.safety import UnsafePathError, atomic_write_text, contained_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"})
MAX_ISSUES = 50  # messages kept per report; the count of the rest is reported


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the file (and line) and the fix."""


# ---- safe unzip ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZipLimits:
    max_total_bytes: int = 8 * 2**30  # uncompressed
    max_files: int = 200_000
    max_ratio: float = 200.0  # uncompressed/compressed for any member over 1 MB: a zip bomb otherwise

    def __post_init__(self) -> None:
        if self.max_total_bytes <= 0 or self.max_files <= 0 or self.max_ratio <= 1:
            raise ValueError(f"invalid zip limits: {self}")


def _check_member(info: zipfile.ZipInfo, limits: ZipLimits) -> None:
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise DatasetError(f"The zip was refused: entry {name!r} points outside the folder (path traversal).")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DatasetError(f"The zip was refused: entry {name!r} is a symbolic link.")
    if info.file_size > 2**20 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
        raise DatasetError(
            f"The zip was refused: entry {name!r} expands {info.file_size / max(info.compress_size, 1):.0f}x "
            f"(limit {limits.max_ratio:.0f}x); this looks like a zip bomb."
        )


def safe_extract_zip(zip_path: Path, dest: Path, limits: ZipLimits | None = None) -> Path:
    """Extract `zip_path` into `dest`, refusing traversal, links and bomb-like sizes before writing anything.

    The declared sizes are checked first and the bytes actually written are counted again while extracting,
    so a lying header cannot get past the limit.
    """
    limits = limits or ZipLimits()
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetError(f"{Path(zip_path).name} is not a readable zip file: {e}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_files:
            raise DatasetError(f"The zip has {len(infos)} entries; the limit is {limits.max_files}.")
        total = sum(i.file_size for i in infos)
        if total > limits.max_total_bytes:
            raise DatasetError(
                f"The zip expands to {total / 2**30:.1f} GiB; the limit is {limits.max_total_bytes / 2**30:.1f} GiB."
            )
        for info in infos:
            _check_member(info, limits)
        written = 0
        dest.mkdir(parents=True, exist_ok=True)
        for info in infos:
            try:
                target = contained_path(dest, info.filename.replace("\\", "/"))
            except UnsafePathError as e:
                raise DatasetError(f"The zip was refused: {e}") from None
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as out:
                while block := src.read(1 << 20):
                    written += len(block)
                    if written > limits.max_total_bytes:
                        raise DatasetError("The zip expands beyond its declared size and the limit; refused.")
                    out.write(block)
    log.info("extracted %s (%d entries, %d bytes) into %s", zip_path, len(infos), written, dest)
    return dest


# ---- validation ------------------------------------------------------------------------------------------
@dataclass
class SplitStats:
    images: int = 0
    labelled: int = 0
    background: int = 0  # empty label file
    instances: int = 0
    polygons: int = 0  # label lines with an outline (segmentation) rather than a box


@dataclass
class DatasetReport:
    root: Path
    yaml_path: Path | None
    names: list[str] = field(default_factory=list)
    splits: dict[str, SplitStats] = field(default_factory=dict)
    split_dirs: dict[str, Path] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    hidden_errors: int = 0
    instances_per_class: dict[str, int] = field(default_factory=dict)
    dataset_hash: str | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, msg: str) -> None:
        if len(self.errors) < MAX_ISSUES:
            self.errors.append(msg)
        else:
            self.hidden_errors += 1

    def warn(self, msg: str) -> None:
        if len(self.warnings) < MAX_ISSUES:
            self.warnings.append(msg)

    def raise_if_invalid(self) -> None:
        if self.errors:
            more = f" (+{len(self.errors) - 3 + self.hidden_errors} more)" if len(self.errors) > 3 else ""
            raise DatasetError("Dataset is not usable: " + "; ".join(self.errors[:3]) + more)

    def markdown(self) -> str:
        lines = [f"**Dataset** `{self.root}` — {'valid' if self.ok else 'NOT valid'}"]
        if self.names:
            lines.append(f"- classes ({len(self.names)}): " + ", ".join(f"{i}={n}" for i, n in enumerate(self.names)))
        for split, s in self.splits.items():
            extra = f", {s.instances} boxes, {s.background} background (empty label file)" if self.yaml_path else ""
            lines.append(f"- {split}: {s.images} images{extra}")
        if self.instances_per_class:
            unit = "boxes" if self.yaml_path else "images"  # a classification folder has no data.yaml
            lines.append(f"- {unit} per class: " + ", ".join(f"{k} {v}" for k, v in self.instances_per_class.items()))
        if self.dataset_hash:
            lines.append(f"- hash: `{self.dataset_hash[:16]}`")
        for title, items in (("Errors", self.errors), ("Warnings", self.warnings)):
            if items:
                extra = f" (+{self.hidden_errors} more)" if title == "Errors" and self.hidden_errors else ""
                lines.append(f"\n**{title}**{extra}:")
                lines += [f"- {m}" for m in items]
        return "\n".join(lines)


def find_data_yaml(root: Path) -> Path | None:
    """data.yaml (or dataset.yaml) in `root` or one folder below (zips often hold one top folder)."""
    for depth in ("", "*/"):
        for name in ("data.yaml", "data.yml", "dataset.yaml"):
            hits = sorted(root.glob(depth + name))
            if hits:
                return hits[0]
    return None


def label_path_for(image: Path) -> Path:
    """Ultralytics' rule: the last `/images/` in the path becomes `/labels/`, the suffix becomes `.txt`."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    s = str(image)
    if sa not in s:
        return image.with_suffix(".txt")
    return Path(sb.join(s.rsplit(sa, 1))).with_suffix(".txt")


def _parse_names(raw: dict, rel: str, report: DatasetReport) -> list[str]:
    names = raw.get("names")
    if isinstance(names, dict):
        try:
            keyed = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            report.error(f"{rel}: 'names' keys must be class ids 0, 1, 2, ...")
            return []
        if sorted(keyed) != list(range(len(keyed))):
            report.error(f"{rel}: 'names' ids must run 0..{len(keyed) - 1} without gaps; got {sorted(keyed)}")
            return []
        names = [keyed[i] for i in range(len(keyed))]
    if not isinstance(names, list) or not names:
        report.error(f"{rel}: needs a non-empty 'names' list, e.g. names: [cat, dog]")
        return []
    nc = raw.get("nc")
    if nc is not None and nc != len(names):
        report.error(f"{rel}: nc is {nc} but 'names' lists {len(names)} classes; make them agree")
    return [str(n) for n in names]


def _resolve_split(root: Path, base: Path, value: object, split: str, rel: str, report: DatasetReport) -> Path | None:
    if isinstance(value, list):
        if len(value) != 1:
            report.error(f"{rel}: '{split}' lists {len(value)} folders; give one folder per split")
            return None
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        report.error(f"{rel}: '{split}' must be a folder of images, e.g. {split}: images/{split}")
        return None
    try:
        folder = contained_path(root, os.path.relpath((base / value).resolve(), root.resolve()))
    except (UnsafePathError, ValueError):
        report.error(f"{rel}: '{split}: {value}' points outside the dataset folder")
        return None
    if folder.is_file():
        report.error(f"{rel}: '{split}: {value}' is a file; image-list files are not supported, give a folder")
        return None
    if not folder.is_dir():
        report.error(f"{rel}: the {split} folder '{value}' does not exist ({folder})")
        return None
    return folder


def _check_image(path: Path, rel: str, report: DatasetReport) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the file unusable; reopen to decode for real
            im.load()
            w, h = im.size
    except Image.DecompressionBombError:
        report.error(f"{rel}: image is too large (decompression-bomb guard); resize it below 89 megapixels")
        return False
    except Exception as e:  # PIL raises many types for truncated/corrupt files
        report.error(f"{rel}: not a readable image (corrupt, truncated or not an image file): {e}")
        return False
    if min(w, h) < 10:
        report.error(f"{rel}: image is only {w}x{h} pixels; at least 10x10 is needed")
        return False
    return True


def _check_label_line(line: str, nc: int, where: str, report: DatasetReport) -> int | None:
    """Class id of a valid line, else None (and an error naming file and line)."""
    parts = line.split()
    if len(parts) != 5 and (len(parts) < 7 or len(parts) % 2 == 0):
        report.error(f"{where}: expected 5 values 'class x_center y_center width height', got {len(parts)}: {line!r}")
        return None
    try:
        cls_f, *coords = (float(p) for p in parts)
    except ValueError:
        bad = next(p for p in parts if not _is_number(p))
        report.error(f"{where}: {bad!r} is not a number")
        return None
    if not all(math.isfinite(v) for v in (cls_f, *coords)):
        report.error(f"{where}: values must be finite numbers, got {line!r}")
        return None
    if cls_f != int(cls_f) or not 0 <= int(cls_f) < nc:
        report.error(f"{where}: class id {parts[0]} is out of range: data.yaml names {nc} classes (ids 0-{nc - 1})")
        return None
    if any(v < 0 or v > 1 for v in coords):
        report.error(f"{where}: coordinates must be normalised to 0-1 (divide by image width/height): {line!r}")
        return None
    if len(parts) == 5 and (coords[2] <= 0 or coords[3] <= 0):
        report.error(f"{where}: box width and height must be > 0: {line!r}")
        return None
    return int(cls_f)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _check_label_file(path: Path, rel: str, nc: int, report: DatasetReport, stats: SplitStats) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        report.error(f"{rel}: not a UTF-8 text file")
        return
    lines = [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if not lines:
        stats.background += 1
        return
    seen: set[str] = set()
    for lineno, line in lines:
        if line in seen:
            report.warn(f"{rel} line {lineno}: duplicate of an earlier line (ignored by training)")
        seen.add(line)
        cls = _check_label_line(line, nc, f"{rel} line {lineno}", report)
        if cls is not None:
            stats.instances += 1
            stats.polygons += len(line.split()) > 5
            name = report.names[cls]
            report.instances_per_class[name] = report.instances_per_class.get(name, 0) + 1
    stats.labelled += 1


def _check_split(split: str, folder: Path, report: DatasetReport) -> None:
    stats = report.splits.setdefault(split, SplitStats())
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        report.error(f"{split} split is empty: no images in {_rel(folder, report.root)} (.jpg/.png/...)")
        return
    missing = []
    for img in images:
        rel = _rel(img, report.root)
        if not _check_image(img, rel, report):
            continue
        stats.images += 1
        label = label_path_for(img)
        if not label.is_file():
            missing.append(rel)
            continue
        _check_label_file(label, _rel(label, report.root), len(report.names), report, stats)
    if missing:
        report.error(
            f"{split}: {len(missing)} image(s) have no label file, e.g. {missing[0]} needs "
            f"{_rel(label_path_for(report.root / missing[0]), report.root)} (an empty file marks a background image)"
        )
    if stats.images and stats.instances == 0:
        report.error(f"{split} split has no boxes at all: every label file is empty")


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def validate_dataset(root: Path, *, compute_hash: bool = True) -> DatasetReport:
    """Check a YOLO dataset folder; never raises for dataset problems (they go into the report)."""
    root = Path(root)
    report = DatasetReport(root=root, yaml_path=None)
    if not root.is_dir():
        report.error(f"dataset folder not found: {root}")
        return report
    yaml_path = find_data_yaml(root)
    if yaml_path is None:
        report.error("no data.yaml found in the dataset root (or one folder down); it must list train, val and names")
        return report
    report.yaml_path = yaml_path
    rel = _rel(yaml_path, root)
    try:
        raw = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        report.error(f"{rel}: not valid YAML: {e}")
        return report
    if not isinstance(raw, dict):
        report.error(f"{rel}: expected a mapping with train, val and names")
        return report
    report.names = _parse_names(raw, rel, report)
    base = yaml_path.parent
    if isinstance(raw.get("path"), str) and raw["path"].strip() not in ("", "."):
        base = base / raw["path"]
    for split in ("train", "val"):
        if split not in raw:
            report.error(f"{rel}: missing '{split}:' (a folder of images, e.g. images/{split})")
            continue
        folder = _resolve_split(root, base, raw[split], split, rel, report)
        if folder is not None:
            report.split_dirs[split] = folder
    if report.names:
        for split, folder in report.split_dirs.items():
            _check_split(split, folder, report)
    if report.ok and compute_hash:
        report.dataset_hash = dataset_hash(root)
    return report


def dataset_hash(root: Path) -> str:
    """sha256 over relative names and contents, skipping Ultralytics' *.cache files and hidden markers
    (training writes labels/*.cache into the dataset, which must not change the recorded hash)."""
    h = hashlib.sha256()
    files = sorted(
        (p for p in Path(root).rglob("*") if p.is_file() and p.suffix != ".cache" and not p.name.startswith(".")),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    for f in files:
        h.update(f.relative_to(root).as_posix().encode("utf-8") + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def write_training_yaml(report: DatasetReport, dest: Path) -> Path:
    """A clean data.yaml (absolute folders, names) for Ultralytics; refuses an invalid report."""
    report.raise_if_invalid()
    data = {
        "path": str(report.root.resolve()),
        "train": str(report.split_dirs["train"].resolve()),
        "val": str(report.split_dirs["val"].resolve()),
        "names": dict(enumerate(report.names)),
    }
    atomic_write_text(dest, yaml.safe_dump(data, sort_keys=False))
    return dest
