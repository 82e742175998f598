"""Readers for labelling-tool exports: COCO JSON (Label Studio, CVAT, Roboflow), Pascal VOC XML (CVAT, Label Studio,
LabelImg) and Label Studio's YOLO export. Each turns its files into `Sample`s (an image file plus normalised boxes
with class names) and reports problems with the file and line (or JSON path) where they are.

Trust: every name inside an export (a COCO `file_name`, a VOC `<filename>`) is only looked up in an index of the
image files that really lie inside the export folder; it never becomes a path of its own, so `../../etc/passwd`
finds nothing. XML is parsed with expat with entity declarations refused (no billion-laughs, no external entities).
No torch, no gradio; Pillow reads image headers only.
"""

from __future__ import annotations

import json
import math
import re
import xml.parsers.expat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from backends.vision.data import IMAGE_SUFFIXES

Issue = Callable[[str], None]


@dataclass
class Sample:
    image: Path
    where: str  # the annotation file (and line) it came from, for messages
    boxes: list[tuple[str, float, float, float, float]] = field(default_factory=list)  # name, cx, cy, w, h (0-1)
    split: str | None = None  # "train" / "val" when the export says so


@dataclass
class Parsed:
    fmt: str
    samples: list[Sample]
    names: list[str]  # class names in the export's own order
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (crowd boxes, empty categories, ...)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


class ImageIndex:
    """Every image file inside `root`, found by relative path or by bare file name (exports disagree on folders)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.by_rel: dict[str, Path] = {}
        self.by_name: dict[str, list[Path]] = {}
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.is_symlink():
                self.by_rel[rel(p, root).lower()] = p
                self.by_name.setdefault(p.name.lower(), []).append(p)

    def find(self, name: str, near: Path | None = None) -> Path | None:
        """The image an export calls `name` ("images/a.jpg", "a.jpg", "C:\\x\\a.jpg", Label Studio's
        "/data/upload/1/ab12-a.jpg"): its path below the annotation file's folder, else a unique bare-name match."""
        clean = name.replace("\\", "/").split("?")[0]
        if near is not None:
            hit = self.by_rel.get(rel(near / clean, self.root).lower()) if ".." not in clean.split("/") else None
            if hit is not None:
                return hit
        base = clean.rsplit("/", 1)[-1].lower()
        hits = self.by_name.get(base, [])
        if len(hits) == 1:
            return hits[0]
        if near is not None:  # same name in several folders: the one below the annotation file
            below = [h for h in hits if near.resolve() in h.parents]
            if len(below) == 1:
                return below[0]
        return None


def image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # unreadable images are reported by the YOLO validator afterwards, with the file name
        return None


def normalise(x1: float, y1: float, x2: float, y2: float, w: int, h: int, where: str, out: Parsed):
    """(cx, cy, bw, bh) in 0-1 from pixel corners, clipped to the image; None (and a message) if unusable."""
    vals = (x1, y1, x2, y2)
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in vals):
        out.errors.append(f"{where}: box coordinates must be finite numbers, got {list(vals)}")
        return None
    if x2 <= x1 or y2 <= y1:
        out.errors.append(f"{where}: box has no area (x {x1:g}-{x2:g}, y {y1:g}-{y2:g}); fix or delete it")
        return None
    cx1, cy1, cx2, cy2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
    if cx2 <= cx1 or cy2 <= cy1:
        out.errors.append(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {w}x{h} image")
        return None
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
        slack = max(cx1 - x1, cy1 - y1, x2 - cx2, y2 - cy2)
        if slack > 2:  # labelling tools round to a pixel or two; more is worth telling
            out.warnings.append(f"{where}: box reaches {slack:.0f} px outside the {w}x{h} image; clipped")
    return ((cx1 + cx2) / 2 / w, (cy1 + cy2) / 2 / h, (cx2 - cx1) / w, (cy2 - cy1) / h)


# ---- COCO JSON -------------------------------------------------------------------------------------------
def is_coco(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("images"), list) and "categories" in data


def load_json(path: Path, root: Path, out: Parsed) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        out.errors.append(f"{rel(path, root)}: not UTF-8 text")
    except json.JSONDecodeError as e:
        out.errors.append(f"{rel(path, root)} line {e.lineno} column {e.colno}: not valid JSON: {e.msg}")
    return None


def _array_lines(text: str, key: str) -> list[int]:
    """Line number of each element of the top-level array `key` (pretty-printed or not); [] if not found."""
    m = re.search(r'"' + key + r'"\s*:\s*\[', text)
    if not m:
        return []
    dec, i, lines = json.JSONDecoder(), m.end(), []
    try:
        while True:
            while text[i] in " \t\r\n,":
                i += 1
            if text[i] == "]":
                return lines
            lines.append(text.count("\n", 0, i) + 1)
            _, i = dec.raw_decode(text, i)
    except (IndexError, ValueError):
        return []


def _coco_categories(cats: Any, anns: list, src: str, out: Parsed) -> dict[int, str]:
    if not isinstance(cats, list) or not all(isinstance(c, dict) and "id" in c and "name" in c for c in cats):
        out.errors.append(f"{src}: 'categories' must be a list of {{id, name}} objects")
        return {}
    used = {a.get("category_id") for a in anns if isinstance(a, dict)}
    supers = {str(c.get("supercategory")) for c in cats if c["id"] in used}
    keep = {}
    for c in sorted(cats, key=lambda c: c["id"] if isinstance(c["id"], int) else 0):
        if c["id"] not in used and str(c["name"]) in supers:  # Roboflow's umbrella class: never used on a box
            out.skip(f"category '{c['name']}' (only a supercategory, no boxes)")
            continue
        keep[c["id"]] = str(c["name"]).strip()
    return keep


def parse_coco(path: Path, root: Path, index: ImageIndex, out: Parsed, split: str | None) -> None:
    """One COCO JSON file: boxes from `bbox` [x, y, width, height] in pixels; crowd regions skipped."""
    src = rel(path, root)
    data = load_json(path, root, out)
    if data is None:
        return
    if not is_coco(data):  # exports carry other JSON too (Label Studio's notes, CVAT task files)
        out.warnings.append(f"{src}: not a COCO file (no 'images' and 'categories'); ignored")
        return
    anns = data.get("annotations") or []
    cats = _coco_categories(data.get("categories"), anns, src, out)
    for name in cats.values():
        if name not in out.names:
            out.names.append(name)
    lines = _array_lines(path.read_text(encoding="utf-8-sig"), "annotations")
    images: dict[Any, tuple[Sample, int, int]] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            out.errors.append(f"{src}: images[{i}] needs an 'id' and a 'file_name'")
            continue
        found = index.find(im["file_name"], path.parent)
        if found is None:
            out.errors.append(f"{src}: images[{i}] file '{im['file_name']}' is not in the export; add the image")
            continue
        real = image_size(found) or (0, 0)
        w, h = int(im.get("width") or real[0]), int(im.get("height") or real[1])
        if real != (0, 0) and (w, h) != real:
            out.warnings.append(f"{src}: images[{i}] says {w}x{h} but {found.name} is {real[0]}x{real[1]}")
        images[im["id"]] = (Sample(found, f"{src} images[{i}]", split=split), w, h)
    for i, a in enumerate(anns):
        where = f"{src} line {lines[i]}" if len(lines) == len(anns) else f"{src} annotations[{i}]"
        _coco_box(a, where, images, cats, out)
    out.samples += [s for s, _, _ in images.values()]


def _coco_box(a: Any, where: str, images: dict, cats: dict[int, str], out: Parsed) -> None:
    if not isinstance(a, dict):
        out.errors.append(f"{where}: an annotation must be an object")
        return
    if a.get("image_id") not in images:
        out.errors.append(f"{where}: image_id {a.get('image_id')!r} is not in 'images' (or its file is missing)")
        return
    if a.get("category_id") not in cats:
        out.errors.append(f"{where}: category_id {a.get('category_id')!r} is not in 'categories'")
        return
    if a.get("iscrowd"):
        out.skip("crowd region (iscrowd=1)")
        return
    bbox = a.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        out.errors.append(f"{where}: 'bbox' must be [x, y, width, height], got {bbox!r}")
        return
    sample, w, h = images[a["image_id"]]
    x, y, bw, bh = bbox
    ok = all(isinstance(v, int | float) for v in bbox)
    box = normalise(x, y, x + bw, y + bh, w, h, where, out) if ok else None
    if not ok:
        out.errors.append(f"{where}: 'bbox' values must be numbers, got {bbox!r}")
    if box is not None:
        sample.boxes.append((cats[a["category_id"]], *box))


# ---- Pascal VOC XML --------------------------------------------------------------------------------------
class _Node:
    def __init__(self, tag: str, line: int) -> None:
        self.tag, self.line, self.text, self.children = tag, line, "", []

    def find(self, tag: str) -> _Node | None:
        return next((c for c in self.children if c.tag == tag), None)

    def value(self, tag: str) -> str:
        node = self.find(tag)
        return node.text.strip() if node is not None else ""


def parse_xml(text: bytes) -> _Node:
    """A small element tree with line numbers; refuses DTD entities (billion laughs, external entities)."""
    parser = xml.parsers.expat.ParserCreate()
    root = _Node("", 0)
    stack = [root]

    def start(tag: str, _attrs: dict) -> None:
        node = _Node(tag, parser.CurrentLineNumber)
        stack[-1].children.append(node)
        stack.append(node)

    def refuse(*_args: Any) -> None:
        raise ValueError("XML entity declarations are not allowed")

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda _tag: stack.pop()
    parser.CharacterDataHandler = lambda data: setattr(stack[-1], "text", stack[-1].text + data)
    parser.EntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.Parse(text, True)
    return root.children[0]


def parse_voc(path: Path, root: Path, index: ImageIndex, out: Parsed, split: str | None) -> None:
    src = rel(path, root)
    try:
        doc = parse_xml(path.read_bytes())
    except (xml.parsers.expat.ExpatError, ValueError) as e:
        out.errors.append(f"{src}: not valid XML: {e}")
        return
    if doc.tag != "annotation":
        out.errors.append(f"{src} line {doc.line}: expected an <annotation> root, got <{doc.tag}>")
        return
    fname = doc.value("filename")
    found = index.find(fname, path.parent.parent) if fname else None
    if found is None:  # LabelImg/CVAT name the image like the xml
        found = next((index.find(path.stem + s) for s in (".jpg", ".png", ".jpeg") if index.find(path.stem + s)), None)
    if found is None:
        out.errors.append(f"{src}: image '{fname or path.stem}' is not in the export; add it (JPEGImages/ or images/)")
        return
    size = doc.find("size")
    real = image_size(found) or (0, 0)
    w = int(float(size.value("width") or 0)) if size is not None else 0
    h = int(float(size.value("height") or 0)) if size is not None else 0
    w, h = (w, h) if w > 0 and h > 0 else real
    sample = Sample(found, src, split=split)
    for obj in (c for c in doc.children if c.tag == "object"):
        _voc_object(obj, f"{src} line {obj.line}", w, h, sample, out)
    out.samples.append(sample)


def _voc_object(obj: _Node, where: str, w: int, h: int, sample: Sample, out: Parsed) -> None:
    name, box = obj.value("name"), obj.find("bndbox")
    if not name:
        out.errors.append(f"{where}: <object> has no <name>")
        return
    if box is None:
        out.skip("object without <bndbox> (polygon or point)")
        return
    try:
        x1, y1, x2, y2 = (float(box.value(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
    except ValueError:
        vals = [box.value(k) for k in ("xmin", "ymin", "xmax", "ymax")]
        out.errors.append(f"{where}: <bndbox> needs numeric xmin, ymin, xmax, ymax; got {vals}")
        return
    norm = normalise(x1 - 1, y1 - 1, x2, y2, w, h, where, out)  # VOC pixels are 1-based and inclusive
    if norm is not None:
        if name not in out.names:
            out.names.append(name)
        sample.boxes.append((name, *norm))


# ---- Label Studio YOLO export (classes.txt + images/ + labels/) -----------------------------------------
def read_class_list(root: Path, out: Parsed) -> list[str]:
    """classes.txt (one name a line), else notes.json's categories (Label Studio writes both)."""
    txt = next(iter(sorted(root.rglob("classes.txt"))), None)
    if txt is not None:
        try:
            return [ln.strip() for ln in txt.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            out.errors.append(f"{rel(txt, root)}: not UTF-8 text")
            return []
    notes = next(iter(sorted(root.rglob("notes.json"))), None)
    data = load_json(notes, root, out) if notes is not None else None
    cats = data.get("categories") if isinstance(data, dict) else None
    if isinstance(cats, list) and all(isinstance(c, dict) and "name" in c for c in cats):
        return [str(c["name"]) for c in sorted(cats, key=lambda c: c.get("id", 0))]
    out.errors.append("no classes.txt (or notes.json) in the export: it names the classes of the label files")
    return []


def parse_yolo_export(root: Path, index: ImageIndex, out: Parsed) -> None:
    from backends.vision.data import label_path_for

    names = read_class_list(root, out)
    out.names += names
    for image in sorted(index.by_rel.values()):
        label = label_path_for(image)
        if not label.is_file():
            out.errors.append(f"{rel(image, root)}: no label file {rel(label, root)} (an empty file marks background)")
            continue
        sample = Sample(image, rel(label, root))
        try:
            text = label.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            out.errors.append(f"{rel(label, root)}: not UTF-8 text")
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                _yolo_line(line, f"{rel(label, root)} line {n}", names, sample, out)
        out.samples.append(sample)


def _yolo_line(line: str, where: str, names: list[str], sample: Sample, out: Parsed) -> None:
    parts = line.split()
    try:
        k, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:5])
    except (ValueError, IndexError):
        out.errors.append(f"{where}: expected 'class x_center y_center width height', got {line.strip()!r}")
        return
    if len(parts) != 5:
        out.errors.append(f"{where}: expected 5 values (boxes; polygons are not imported), got {len(parts)}")
    elif not 0 <= k < len(names):
        out.errors.append(f"{where}: class id {k} is out of range: classes.txt names {len(names)} classes")
    elif not all(0 <= v <= 1 for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
        out.errors.append(f"{where}: coordinates must be in 0-1 with width and height > 0: {line.strip()!r}")
    else:
        sample.boxes.append((names[k], cx, cy, w, h))
