"""Image-text training data: JSONL lines of images + a conversation, checked with file:line messages (torch-free).

One example per line:
    {"images": ["cats/1.png"], "conversations": [{"role": "user", "content": "What animal is this?"},
                                                 {"role": "assistant", "content": "A tabby cat."}]}
`"image": "x.png"` (one image) and LLaVA's own `{"from": "human"|"gpt", "value": "<image>\\n..."}` turns are accepted
too. Image paths are relative to the JSONL file's folder and must stay inside it. The images belong to the first
user turn. Every problem of the whole file is collected (malformed JSON, wrong keys or roles, empty turns, a
missing, corrupt, truncated or oversized image, too many images, exact duplicates) and reported together.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from backends.vlm.images import prepare_image
from backends.vlm.types import ImageOptions, PreparedImage, VLMError
from studio.datafiles import TextFileError, jsonl_lines
from studio.safety import UnsafePathError, contained_path

_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MAX_ERRORS_SHOWN = 20
_EXAMPLE_LINE = '{"images": ["a.png"], "conversations": [{"role": "user", "content": ...}, ...]}'


class VLMDataError(VLMError):
    """The dataset has problems; `errors` lists them as 'file:line: what'."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        more = f"\n... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        super().__init__(f"{len(errors)} problem(s) in the dataset:\n" + "\n".join(errors[:MAX_ERRORS_SHOWN]) + more)


@dataclass(frozen=True)
class Example:
    where: str  # "file.jsonl:12"
    messages: tuple[dict[str, str], ...]
    images: tuple[PreparedImage, ...]


def _turns(obj: dict, where: str, errors: list[str]) -> list[dict[str, str]]:
    conv = obj.get("conversations", obj.get("messages"))
    if not isinstance(conv, list) or not conv:
        errors.append(f"{where}: needs a non-empty 'conversations' list of {{'role', 'content'}} turns")
        return []
    turns = []
    for i, t in enumerate(conv):
        role = _ROLE_ALIASES.get(str(t.get("role", t.get("from", ""))).lower()) if isinstance(t, dict) else None
        content = t.get("content", t.get("value")) if isinstance(t, dict) else None
        if role is None or not isinstance(content, str):
            errors.append(f"{where}: turn {i} must be {{'role': 'user'|'assistant'|'system', 'content': str}}")
            return []
        content = content.replace("<image>", "").strip()
        if not content or "\x00" in content:
            errors.append(f"{where}: turn {i} ({role}) is empty or holds a null byte")
            return []
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in turns) or not any(t["role"] == "user" for t in turns):
        errors.append(f"{where}: needs at least one user and one assistant turn (the assistant's are learnt)")
        return []
    return turns


def _images(obj: dict, root: Path, where: str, opts: ImageOptions, max_images: int, errors: list[str]):
    names = obj.get("images", obj.get("image", []))
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        errors.append(f"{where}: 'images' must be a list of file names relative to {root}")
        return None
    if len(names) > max_images:
        errors.append(f"{where}: {len(names)} images; this model takes at most {max_images}")
        return None
    out = []
    for name in names:
        try:
            path = contained_path(root, name)
        except UnsafePathError as e:
            errors.append(f"{where}: {e}")
            return None
        if not path.is_file():
            errors.append(f"{where}: image '{name}' not found (looked in {root})")
            return None
        try:
            out.append(prepare_image(path, opts))
        except VLMError as e:
            errors.append(f"{where}: {e}")
            return None
    return tuple(out)


def load_examples(path: Path, opts: ImageOptions, *, max_images: int = 4) -> list[Example]:
    """Read and check the whole file; raise VLMDataError listing every problem (nothing is trained on bad data)."""
    path = Path(path)
    if not path.is_file():
        raise VLMError(f"Dataset file not found: {path}")
    errors: list[str] = []
    examples: list[Example] = []
    seen: dict[str, str] = {}
    try:
        lines = list(jsonl_lines(path, example=_EXAMPLE_LINE))
    except TextFileError as e:
        raise VLMError(str(e)) from None
    for line in lines:
        where, obj = line.where, line.value
        if obj is None:
            errors.append(f"{where}: {line.problem}")
            continue
        turns = _turns(obj, where, errors)
        images = _images(obj, path.parent, where, opts, max_images, errors) if turns else None
        if not turns or images is None:
            continue
        sig = json.dumps([turns, [p.digest for p in images]])
        if sig in seen:
            errors.append(f"{where}: exact duplicate of {seen[sig]} (remove one)")
            continue
        seen[sig] = where
        examples.append(Example(where, tuple(turns), images))
    if errors:
        raise VLMDataError(errors)
    if not examples:
        raise VLMError(f"{path.name} holds no examples: one JSON object per line (see the VLM tab's help).")
    return examples


def split_dev(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, dev): a seeded shuffle; the dev set gets round(n * fraction) examples, at least 1 when n >= 2."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_dev = max(1 if len(order) >= 2 else 0, round(len(order) * fraction))
    dev, train = order[:n_dev], order[n_dev:]
    return (train or dev), dev
