"""Saved conversations of the Chat tab: list, reopen, rename, delete; one JSON file per conversation.

Files live under `<data_dir>/chats/<browser id>/<conversation id>.json`, written atomically after every reply. The
browser id is a random hex string kept in the browser's local storage (gr.BrowserState), so a reload finds the list
again and two browsers never see each other's conversations. Ids come from the client, so both are checked against
a strict pattern before they name a path.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ID_RE = re.compile(r"^[0-9a-f]{8,64}$")
TITLE_MAX = 80


@dataclass(frozen=True)
class Saved:
    id: str
    title: str
    updated: float
    messages: list[dict[str, str]]


def new_id() -> str:
    return secrets.token_hex(8)


def _folder(data_dir: Path, browser_id: str) -> Path:
    if not isinstance(browser_id, str) or not ID_RE.match(browser_id):
        raise ValueError(f"Invalid browser id {browser_id!r}: reload the page.")
    return Path(data_dir) / "chats" / browser_id


def _file(data_dir: Path, browser_id: str, conv_id: str) -> Path:
    if not isinstance(conv_id, str) or not ID_RE.match(conv_id):
        raise ValueError(f"Invalid conversation id {conv_id!r}: pick one from the list.")
    return _folder(data_dir, browser_id) / f"{conv_id}.json"


def default_title(messages: list[dict[str, str]]) -> str:
    first = next((m["content"] for m in messages if m["role"] == "user"), "New conversation")
    first = " ".join(first.split())
    return first if len(first) <= 48 else first[:47] + "…"


def save(data_dir: Path, browser_id: str, conv_id: str, messages: list[dict[str, str]], title: str = "") -> Saved:
    from studio.safety import atomic_write_text

    path = _file(data_dir, browser_id, conv_id)
    if not title and path.is_file():
        title = load(data_dir, browser_id, conv_id).title
    item = Saved(conv_id, (title or default_title(messages))[:TITLE_MAX], time.time(), list(messages))
    body = {"title": item.title, "updated": item.updated, "messages": item.messages}
    atomic_write_text(path, json.dumps(body, ensure_ascii=False, indent=1))
    return item


def load(data_dir: Path, browser_id: str, conv_id: str) -> Saved:
    path = _file(data_dir, browser_id, conv_id)
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError("That conversation no longer exists (deleted in another tab?).") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"Conversation file {path.name} is unreadable ({e}); delete it.") from None
    msgs = [m for m in body.get("messages", []) if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return Saved(conv_id, str(body.get("title") or default_title(msgs)), float(body.get("updated", 0)), msgs)


def listing(data_dir: Path, browser_id: str | None) -> list[Saved]:
    """Newest first; unreadable files are skipped (they stay on disk for the user to inspect)."""
    if not browser_id or not ID_RE.match(str(browser_id)):
        return []
    items = []
    for path in _folder(data_dir, browser_id).glob("*.json"):
        try:
            items.append(load(data_dir, browser_id, path.stem))
        except ValueError:
            continue
    return sorted(items, key=lambda s: s.updated, reverse=True)


def rename(data_dir: Path, browser_id: str, conv_id: str, title: str) -> Saved:
    title = " ".join((title or "").split())
    if not title:
        raise ValueError("Type the new name first.")
    item = load(data_dir, browser_id, conv_id)
    return save(data_dir, browser_id, conv_id, item.messages, title)


def delete(data_dir: Path, browser_id: str, conv_id: str) -> None:
    _file(data_dir, browser_id, conv_id).unlink(missing_ok=True)


def choices(data_dir: Path, browser_id: str | None) -> list[tuple[str, str]]:
    stamp = "%d %b %H:%M"
    return [(f"{s.title} · {time.strftime(stamp, time.localtime(s.updated))}", s.id) for s in
            listing(data_dir, browser_id)]  # fmt: skip


def ensure_browser_id(value: Any) -> str:
    return value if isinstance(value, str) and ID_RE.match(value) else secrets.token_hex(16)
