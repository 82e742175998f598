"""Import a labelling tool's export into a validated YOLO dataset (data.yaml, images/{train,val}, labels/...).

Steps: 1. find the format (COCO JSON, Pascal VOC XML, Label Studio's YOLO export) unless given; 2. read every
annotation file (`importers`), collecting problems with file and line; 3. map class names (rename, merge, drop)
and number the classes 0..n-1 in the export's order; 4. split train/val: the export's own split when it has both
(Roboflow's train/valid folders, CVAT's instances_train/val), else by a hash of each image's path (stable: adding
images never moves the old ones); 5. write the dataset into a temp folder and rename it into place, so a failed
import leaves nothing half-written; 6. validate the result with the YOLO validator (`data.validate_dataset`).

Policy: any error (a box outside its image, an unknown category, a missing image file) refuses the import and is
listed; warnings (clipped boxes, skipped crowd regions, images no annotation file mentions) let it go on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from backends.vision.data import MAX_ISSUES, DatasetError, DatasetReport, validate_dataset
from backends.vision.importers import (
    ImageIndex,
    Parsed,
    Sample,
    is_coco,
    parse_coco,
    parse_voc,
    parse_yolo_export,
    rel,
)
from studio.safety import safe_filename

log = logging.getLogger(__name__)

FORMATS = ("auto", "coco", "voc", "yolo")
FORMAT_TITLES = {"coco": "COCO JSON", "voc": "Pascal VOC XML", "yolo": "YOLO export (classes.txt + labels/)"}
VAL_WORDS, TRAIN_WORDS = {"val", "valid", "validation", "test"}, {"train", "training"}


class DatasetImportError(DatasetError):
    """The import options or the export's layout cannot be used; the message says what to change."""


@dataclass(frozen=True)
class ImportOptions:
    fmt: str = "auto"
    val_fraction: float = 0.2  # share of images in val when the export has no split of its own
    rename: tuple[tuple[str, str], ...] = ()  # (class in the export, class in the dataset); "" drops the class
    keep_splits: bool = True  # the export's own train/val split wins over the hash split
    salt: str = ""  # a different salt gives a different (still stable) hash split

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise DatasetImportError(f"format {self.fmt!r} is not one of {', '.join(FORMATS)}")
        if not 0.05 <= self.val_fraction <= 0.5:
            raise DatasetImportError(f"validation share must be between 0.05 and 0.5, got {self.val_fraction}")
        sources = [a for a, _ in self.rename]
        dup = {a for a in sources if sources.count(a) > 1}
        if dup:
            raise DatasetImportError(f"class mapping names {sorted(dup)} twice; give each export class once")


def parse_mapping(text: str | None) -> tuple[tuple[str, str], ...]:
    """'old = new' per line ('old =' drops the class, '#' starts a comment) -> ImportOptions.rename."""
    out = []
    for n, raw in enumerate((text or "").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        sep = "=" if "=" in line else "->" if "->" in line else None
        if sep is None:
            raise DatasetImportError(f"class mapping line {n}: write 'name in export = new name' (or 'name =' to drop)")
        old, new = (p.strip() for p in line.split(sep, 1))
        if not old:
            raise DatasetImportError(f"class mapping line {n}: the export's class name is missing before '{sep}'")
        out.append((old, new))
    return tuple(out)


@dataclass
class ImportReport:
    fmt: str
    source: Path
    dest: Path | None = None
    names: list[str] = field(default_factory=list)
    mapping: list[tuple[str, str, int]] = field(
        default_factory=list
    )  # export class, dataset class ("" = dropped), boxes
    images: dict[str, int] = field(default_factory=dict)
    boxes: int = 0
    split_by: str = "hash"
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    dataset: DatasetReport | None = None

    @property
    def ok(self) -> bool:
        return not self.errors and self.dataset is not None and self.dataset.ok

    def markdown(self) -> str:
        head = f"**Import** of `{self.source.name}` as {FORMAT_TITLES.get(self.fmt, self.fmt)}: "
        lines = [head + ("done" if self.ok else "NOT done")]
        if self.dest is not None:
            lines.append(f"- dataset folder: `{self.dest}`")
        if self.images:
            split = "the export's own split" if self.split_by == "export" else "a hash of each image path"
            counts = ", ".join(f"{k} {v}" for k, v in self.images.items())
            lines.append(f"- images: {counts} (split by {split}); {self.boxes} boxes")
        if self.mapping:
            lines.append("\n| class in the export | class in the dataset | boxes |\n|---|---|---|")
            lines += [f"| {a} | {b or '(dropped)'} | {n} |" for a, b, n in self.mapping]
        lines += [f"- skipped: {n} × {why}" for why, n in self.skipped.items()]
        for title, items in (("Errors", self.errors), ("Warnings", self.warnings)):
            if items:
                more = f" (first {MAX_ISSUES} shown)" if len(items) >= MAX_ISSUES else ""
                lines += [f"\n**{title}**{more}:", *(f"- {m}" for m in items[:MAX_ISSUES])]
        if self.dataset is not None:
            lines += ["", self.dataset.markdown()]
        return "\n".join(lines)


def detect_format(root: Path) -> str:
    """'coco', 'voc' or 'yolo' from the files in the export; DatasetImportError when none fits."""
    import json

    for path in sorted(root.rglob("*.json")):
        if path.name == "notes.json" or path.stat().st_size > 512 * 2**20:
            continue
        try:
            if is_coco(json.loads(path.read_text(encoding="utf-8-sig"))):
                return "coco"
        except (ValueError, UnicodeDecodeError):
            return "coco"  # a broken JSON file is most likely the COCO file: let its reader say where it breaks
    for path in sorted(root.rglob("*.xml")):
        if b"<annotation" in path.read_bytes()[:4096]:
            return "voc"
    if any(root.rglob("classes.txt")) or any(root.rglob("notes.json")):
        return "yolo"
    raise DatasetImportError(
        "could not tell the export's format: expected a COCO .json (images, annotations, categories), Pascal VOC "
        ".xml files (<annotation>) or a YOLO export (classes.txt with images/ and labels/)"
    )


def _split_of(path: Path, root: Path) -> str | None:
    words = {w.lower() for part in Path(rel(path, root)).parts for w in part.replace(".", "_").split("_")}
    if words & VAL_WORDS:
        return "val"
    return "train" if words & TRAIN_WORDS else None


def read_export(root: Path, fmt: str) -> Parsed:
    index = ImageIndex(root)
    out = Parsed(fmt, [], [])
    if fmt == "coco":
        files = [p for p in sorted(root.rglob("*.json")) if p.name != "notes.json"]
        for path in files:
            parse_coco(path, root, index, out, _split_of(path, root))
    elif fmt == "voc":
        sets = _voc_image_sets(root)
        for path in sorted(root.rglob("*.xml")):
            if b"<annotation" in path.read_bytes()[:4096]:
                parse_voc(path, root, index, out, sets.get(path.stem))
    else:
        parse_yolo_export(root, index, out)
    out.samples = _dedupe(out.samples, root, out)
    used = {s.image for s in out.samples}
    unused = [p for p in index.by_rel.values() if p not in used]
    if unused and fmt != "yolo":
        out.warnings.append(f"{len(unused)} image file(s) no annotation file mentions were left out, e.g. "
                            f"{rel(unused[0], root)}")  # fmt: skip
    return out


def _dedupe(samples: list[Sample], root: Path, out: Parsed) -> list[Sample]:
    """One sample per image file: an image that two annotation files list keeps the first one's boxes."""
    seen: dict[Path, Sample] = {}
    for s in samples:
        if s.image in seen:
            seen[s.image].split = seen[s.image].split or s.split  # a split folder's listing names the split
            out.warnings.append(f"{rel(s.image, root)} is annotated in both {seen[s.image].where} and {s.where}; "
                                "the first is used")  # fmt: skip
            continue
        seen[s.image] = s
    return list(seen.values())


def _voc_image_sets(root: Path) -> dict[str, str]:
    """VOC's ImageSets/Main/{train,val}.txt: image stem -> split."""
    out: dict[str, str] = {}
    for split, names in (("train", ("train.txt",)), ("val", ("val.txt", "test.txt"))):
        for name in names:
            for f in root.rglob(f"ImageSets/Main/{name}"):
                for line in f.read_text(encoding="utf-8", errors="replace").split():
                    out.setdefault(line.strip(), split)
    return out


def _class_map(parsed: Parsed, rename: tuple[tuple[str, str], ...], report: ImportReport) -> dict[str, str]:
    known = set(parsed.names)
    for old, _ in rename:
        if old not in known:
            report.errors.append(f"class mapping names '{old}', which the export does not have; its classes: "
                                 + ", ".join(parsed.names))  # fmt: skip
    table = dict(rename)
    mapped = {n: table.get(n, n) for n in parsed.names}
    counts = {n: 0 for n in parsed.names}
    for s in parsed.samples:
        for b in s.boxes:
            counts[b[0]] += 1
    report.mapping = [(n, mapped[n], counts[n]) for n in parsed.names]
    report.names = list(dict.fromkeys(v for v in mapped.values() if v))
    if not report.names and not report.errors:
        report.errors.append("no classes left: the export has none, or the mapping drops them all")
    return mapped


def hash_fraction(name: str, salt: str = "") -> float:
    return int(hashlib.sha256((salt + name).encode("utf-8")).hexdigest()[:12], 16) / 16**12


def assign_splits(samples: list[Sample], root: Path, opts: ImportOptions) -> str:
    """Sets each sample's split; returns 'export' or 'hash'. At least one image in each split (when n >= 2)."""
    given = {s.split for s in samples}
    if opts.keep_splits and {"train", "val"} <= given:
        for s in samples:
            s.split = s.split or "train"
        return "export"
    keyed = sorted(samples, key=lambda s: hash_fraction(rel(s.image, root), opts.salt))
    for s in keyed:
        s.split = "val" if hash_fraction(rel(s.image, root), opts.salt) < opts.val_fraction else "train"
    if len(keyed) >= 2 and all(s.split == "train" for s in keyed):
        keyed[0].split = "val"
    if len(keyed) >= 2 and all(s.split == "val" for s in keyed):
        keyed[-1].split = "train"
    return "hash"


def _write(samples: list[Sample], names: list[str], mapped: dict[str, str], root: Path, tmp: Path) -> int:
    ids = {n: i for i, n in enumerate(names)}
    taken: set[str] = set()
    boxes = 0
    for s in samples:
        stem = safe_filename(s.image.stem, "image")
        if stem.lower() in taken:  # same name in two folders of the export
            stem = f"{stem}-{hashlib.sha256(rel(s.image, root).encode()).hexdigest()[:8]}"
        taken.add(stem.lower())
        img_dir, lbl_dir = tmp / "images" / s.split, tmp / "labels" / s.split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s.image, img_dir / (stem + s.image.suffix.lower()))
        lines = [f"{ids[mapped[n]]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for n, cx, cy, w, h in s.boxes if mapped[n]]
        boxes += len(lines)
        (lbl_dir / f"{stem}.txt").write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    data = {"path": ".", "train": "images/train", "val": "images/val", "names": dict(enumerate(names))}
    (tmp / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return boxes


def import_dataset(root: Path, dest: Path, opts: ImportOptions | None = None) -> ImportReport:
    """Read the export in `root`, write a YOLO dataset at `dest` (which must not exist yet) and validate it."""
    opts = opts or ImportOptions()
    root = Path(root)
    if not root.is_dir():
        raise DatasetImportError(f"export folder not found: {root}")
    if dest.exists() and any(dest.iterdir()):
        raise DatasetImportError(f"the dataset folder {dest.name} already exists; choose another name")
    fmt = detect_format(root) if opts.fmt == "auto" else opts.fmt
    parsed = read_export(root, fmt)
    report = ImportReport(fmt, root, errors=parsed.errors, warnings=parsed.warnings, skipped=parsed.skipped)
    if not parsed.samples and not parsed.errors:
        report.errors.append(f"no annotated images found in the export as {FORMAT_TITLES[fmt]}")
    mapped = _class_map(parsed, opts.rename, report)
    if report.errors:
        return report
    report.split_by = assign_splits(parsed.samples, root, opts)
    for split in ("train", "val"):
        report.images[split] = sum(s.split == split for s in parsed.samples)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        report.boxes = _write(parsed.samples, report.names, mapped, root, tmp)
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.dest = dest
    report.dataset = validate_dataset(dest)
    log.info("imported %s export %s: %s images, %d boxes, %d classes -> %s",
             fmt, root, report.images, report.boxes, len(report.names), dest)  # fmt: skip
    return report
