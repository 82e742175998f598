"""Where knowledge bases live: one Chroma collection per base plus a JSON manifest of the files in it.

Layout under `data_dir/rag/`: `chroma/` (a chromadb PersistentClient, telemetry off), `manifests/<name>.json`
(written atomically: embedding model, chunking, sources, and per file its hash, size, mtime and chunk count),
`uploads/<name>/` (files uploaded through the UI). Chroma never embeds anything itself: every collection is made
with `embedding_function=None` and receives our vectors, because its default embedding function downloads a model.
A chunk's metadata carries `path` (absolute file path, the manifest key), `display` (folder name + relative path),
`start_line`, `end_line`, `page` and `heading`.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.safety import WINDOWS_RESERVED, atomic_write_json, contained_path, safe_filename

KB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")
GET_PAGE = 5000  # rows per chroma `get` when reading a whole collection


class KnowledgeBaseError(ValueError):
    """A knowledge base that does not exist, is empty, or cannot take this operation."""


def check_kb_name(name: str) -> str:
    """A knowledge base name must already be a safe file name: refused (with a suggestion), never rewritten."""
    raw = name if isinstance(name, str) else ""
    stripped = raw.strip()
    if not stripped:
        raise KnowledgeBaseError("The knowledge base name is empty: type a name such as 'my-notes'.")
    if "\x00" in stripped:
        raise KnowledgeBaseError("The knowledge base name contains a null byte (\\x00); type it again.")
    if KB_NAME.match(stripped) and safe_filename(stripped) == stripped:
        return stripped
    suggestion = safe_filename(stripped.replace(".", "_"), default="my-notes")[:48].strip("_-") or "my-notes"
    if suggestion.upper() in WINDOWS_RESERVED:  # CON, NUL, COM1 ... name devices on Windows
        suggestion += "-notes"
    raise KnowledgeBaseError(
        f"Knowledge base name {raw!r} is not allowed: use up to 48 letters, digits, '-' or '_' "
        f"(for example {suggestion!r})."
    )


@dataclass(frozen=True)
class KBInfo:
    name: str
    files: int
    chunks: int
    sources: tuple[str, ...]
    embedding_model: str
    updated: str


class Store:
    """Chroma client and manifests for every knowledge base under one folder (thread-safe)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._client: Any = None
        self._lock = threading.RLock()

    # ---- paths and manifests ----------------------------------------------------------------------------
    def manifest_path(self, name: str) -> Path:
        return contained_path(self.root / "manifests", f"{check_kb_name(name)}.json")

    def uploads_dir(self, name: str) -> Path:
        return contained_path(self.root / "uploads", check_kb_name(name))

    def names(self) -> list[str]:
        folder = self.root / "manifests"
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.json") if KB_NAME.match(p.stem))

    def exists(self, name: str) -> bool:
        return self.manifest_path(name).is_file()

    def load_manifest(self, name: str) -> dict[str, Any]:
        import json

        path = self.manifest_path(name)
        if not path.is_file():
            known = ", ".join(self.names()) or "none yet"
            raise KnowledgeBaseError(f"Knowledge base {name!r} does not exist (known: {known}); create it first.")
        return json.loads(path.read_text(encoding="utf-8"))

    def save_manifest(self, name: str, manifest: dict[str, Any]) -> None:
        manifest["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        atomic_write_json(self.manifest_path(name), manifest)

    def create(self, name: str, *, embedding_model: str, dim: int, chunking: dict[str, Any]) -> dict[str, Any]:
        """Create an empty knowledge base, or return the existing one."""
        with self._lock:
            if self.exists(name):
                return self.load_manifest(name)
            manifest = {
                "name": check_kb_name(name),
                "embedding_model": embedding_model,
                "dim": dim,
                "chunking": chunking,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "version": 0,
                "sources": [],
                "files": {},
            }
            self.collection(name)
            self.save_manifest(name, manifest)
            return manifest

    def delete(self, name: str) -> None:
        import shutil

        with self._lock:
            with contextlib.suppress(Exception):
                self.client().delete_collection(self.collection_name(name))
            self.manifest_path(name).unlink(missing_ok=True)
            uploads = self.uploads_dir(name)
            if uploads.is_dir():
                shutil.rmtree(uploads)

    def info(self, name: str) -> KBInfo:
        m = self.load_manifest(name)
        files = m.get("files", {})
        return KBInfo(
            name=m["name"],
            files=len(files),
            chunks=sum(int(f.get("chunks", 0)) for f in files.values()),
            sources=tuple(m.get("sources", ())),
            embedding_model=m.get("embedding_model", ""),
            updated=m.get("updated", ""),
        )

    # ---- chroma -----------------------------------------------------------------------------------------
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import chromadb
                from chromadb.config import Settings as ChromaSettings

                path = self.root / "chroma"
                path.mkdir(parents=True, exist_ok=True)
                self._client = chromadb.PersistentClient(
                    path=str(path), settings=ChromaSettings(anonymized_telemetry=False, allow_reset=False)
                )
            return self._client

    @staticmethod
    def collection_name(name: str) -> str:
        return f"kb-{check_kb_name(name)}-v1"  # chroma names must start and end with a letter or digit

    def collection(self, name: str) -> Any:
        return self.client().get_or_create_collection(
            self.collection_name(name), embedding_function=None, metadata={"hnsw:space": "cosine"}
        )

    def all_documents(self, name: str) -> tuple[list[str], list[str]]:
        """(ids, documents) of a whole collection, read in pages."""
        col = self.collection(name)
        ids: list[str] = []
        docs: list[str] = []
        offset = 0
        while True:
            page = col.get(include=["documents"], limit=GET_PAGE, offset=offset)
            ids += page["ids"]
            docs += [d or "" for d in page["documents"]]
            if len(page["ids"]) < GET_PAGE:
                return ids, docs
            offset += GET_PAGE


def vector_scores(col: Any, qvec: Any, ids: list[str], vec: dict[str, float], records: dict) -> None:
    """Cosine similarity of `ids` (keyword-only candidates): their stored vectors against the question's."""
    if not ids or qvec is None:
        return
    import numpy as np

    got = col.get(ids=ids, include=["embeddings", "documents", "metadatas"])
    emb = np.asarray(got["embeddings"], dtype=np.float32)
    for doc_id, e, doc, meta in zip(got["ids"], emb, got["documents"], got["metadatas"], strict=True):
        vec[doc_id] = float(e @ qvec)
        records[doc_id] = (doc, meta)


def fetch_records(col: Any, ids: list[str], records: dict) -> None:
    """Add (document, metadata) of the `ids` not yet in `records`."""
    missing = [d for d in ids if d not in records]
    if missing:
        got = col.get(ids=missing, include=["documents", "metadatas"])
        for doc_id, doc, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True):
            records[doc_id] = (doc, meta)
