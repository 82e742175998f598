"""Classification datasets (Ultralytics' layout): `train/<class>/*.jpg` and `val/<class>/*.jpg` (or `valid/`).

The class names are the folder names of train/, sorted (Ultralytics numbers them that way); every val class must
exist in train. Images are decoded to check them, as for detection (`data._check_image`). The report is the
detection one (`DatasetReport`), so the tab and the trainer treat both alike.
"""

from __future__ import annotations

from pathlib import Path

from backends.vision.data import IMAGE_SUFFIXES, DatasetReport, SplitStats, _check_image, _rel, dataset_hash


def _split_folder(root: Path, split: str) -> Path | None:
    names = ("val", "valid", "validation") if split == "val" else ("train",)
    return next((root / n for n in names if (root / n).is_dir()), None)


def _check_cls_split(split: str, folder: Path, report: DatasetReport, names: list[str]) -> None:
    stats = report.splits.setdefault(split, SplitStats())
    loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        report.error(f"{_rel(loose[0], report.root)}: images must sit in a folder per class, e.g. {split}/cat/")
    for cls_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = sorted(p for p in cls_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if cls_dir.name not in names:
            report.error(f"{_rel(cls_dir, report.root)}: class '{cls_dir.name}' is not in train/; add it there")
            continue
        if not images:
            report.error(f"{_rel(cls_dir, report.root)}: no images in this class folder")
            continue
        good = sum(_check_image(p, _rel(p, report.root), report) for p in images)
        stats.images += good
        stats.labelled += good
        stats.instances += good
        report.instances_per_class[cls_dir.name] = report.instances_per_class.get(cls_dir.name, 0) + good


def validate_cls_dataset(root: Path, *, compute_hash: bool = True) -> DatasetReport:
    """Check a classification folder; never raises for dataset problems (they go into the report)."""
    root = Path(root)
    report = DatasetReport(root=root, yaml_path=None)
    if not root.is_dir():
        report.error(f"dataset folder not found: {root}")
        return report
    if _split_folder(root, "train") is None:
        inner = [p for p in root.iterdir() if p.is_dir() and _split_folder(p, "train") is not None]
        if len(inner) == 1:  # a zip with one top folder
            root = report.root = inner[0]
    train, val = _split_folder(root, "train"), _split_folder(root, "val")
    if train is None or val is None:
        report.error("a classification dataset needs train/<class>/ and val/<class>/ folders of images")
        return report
    report.names = sorted(p.name for p in train.iterdir() if p.is_dir())
    if len(report.names) < 2:
        report.error(f"train/ has {len(report.names)} class folder(s); classification needs at least 2")
        return report
    report.split_dirs = {"train": train, "val": val}
    for split, folder in report.split_dirs.items():
        _check_cls_split(split, folder, report, report.names)
    if report.ok and compute_hash:
        report.dataset_hash = dataset_hash(root)
    return report
