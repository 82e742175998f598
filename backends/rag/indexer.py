"""Incremental ingestion of one folder into a knowledge base, with bounded memory, progress and cancel.

Per file: unchanged size+mtime -> skipped without reading; else read and hash (sha256): same hash -> unchanged;
new or changed -> decoded, chunked, embedded, and its old chunks replaced. Files of this folder that the
manifest knows but that are gone (or now unreadable) have their chunks dropped, unless the run was cancelled.
Chunks are embedded and written in batches of `flush_chunks`; the manifest records a file only after all of
its chunks are written, and a file's old chunks are deleted in the same batch, so a cancelled or killed run
leaves the index consistent (at worst a file is read again next time). Memory holds one batch, the file list
(one small record per file), and an embedding cache keyed by chunk text (identical chunks such as licence
headers are embedded once per run).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backends.rag.chunk import Chunk, ChunkOptions, chunk_document
from backends.rag.ingest import FoundFile, SkipFile, discover, read_document
from backends.rag.store import Store

log = logging.getLogger(__name__)
MAX_NOTES = 200
Progress = Callable[[float, str], None]
Stop = Callable[[], bool]
CACHE_LIMIT = 20_000


@dataclass
class IngestReport:
    kb: str
    folder: str
    files_found: int = 0
    files_indexed: int = 0  # new or changed files now in the index
    files_unchanged: int = 0
    files_removed: int = 0
    files_skipped: int = 0
    chunks_added: int = 0
    chunks_total: int = 0
    files_total: int = 0
    skipped_by_reason: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    cancelled: bool = False
    seconds: float = 0.0

    def note(self, msg: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(msg)
        elif len(self.notes) == MAX_NOTES:
            self.notes.append("... more notes not shown (see the counts above).")

    def skip(self, display: str, reason: str, category: str = "") -> None:
        self.files_skipped += 1
        self.skipped_by_reason[category or reason.split(" (")[0].split(":")[0]] += 1
        self.note(f"{display}: {reason}")

    def summary(self) -> str:
        head = "Cancelled" if self.cancelled else "Done"
        why = ", ".join(f"{n} {reason}" for reason, n in self.skipped_by_reason.most_common(4))
        return (
            f"{head} in {self.seconds:.1f} s: {self.files_found} files found, {self.files_indexed} indexed, "
            f"{self.files_unchanged} unchanged, {self.files_removed} removed, {self.files_skipped} skipped"
            + (f" ({why})" if why else "")
            + "; "
            f"{self.chunks_added} chunks added. Knowledge base {self.kb!r} now holds {self.files_total} files, "
            f"{self.chunks_total} chunks."
        )


@dataclass
class _Pending:
    ids: list[str] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # manifest entries, committed on flush
    bytes: int = 0


def _file_id(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class Indexer:
    """Runs one ingest of `folder` into knowledge base `kb` (create it first with Store.create)."""

    def __init__(
        self,
        store: Store,
        kb: str,
        embed: Callable[[list[str]], np.ndarray],
        *,
        chunking: ChunkOptions,
        max_file_bytes: int,
        max_files: int,
        flush_chunks: int = 64,
    ) -> None:
        self.store, self.kb, self.embed = store, kb, embed
        self.chunking, self.max_file_bytes, self.max_files = chunking, max_file_bytes, max_files
        self.flush_chunks = flush_chunks
        self._cache: dict[str, np.ndarray] = {}

    def run(
        self,
        folder: Path,
        progress: Progress = lambda f, m: None,
        should_stop: Stop = lambda: False,
    ) -> IngestReport:
        t0 = time.perf_counter()
        report = IngestReport(self.kb, str(folder))
        manifest = self.store.load_manifest(self.kb)
        files, notes = discover(folder, self.max_files)
        for n in notes:
            report.note(n)
        report.files_found = len(files)
        if not files:
            raise ValueError(f"The folder {folder} has no files to ingest (hidden files are not read).")
        self._manifest, self._col = manifest, self.store.collection(self.kb)
        if str(folder) not in manifest["sources"]:
            manifest["sources"].append(str(folder))
        self._total_bytes = max(1, sum(f.size for f in files))
        self._done_bytes, self._last_save = 0, time.monotonic()
        seen: set[str] = set()
        pending = _Pending()
        for i, found in enumerate(files):
            if should_stop():
                report.cancelled = True
                break
            seen.add(str(found.path))
            self._one_file(found, folder, pending, report)
            if len(pending.ids) >= self.flush_chunks and not self._flush(pending, report, progress, should_stop):
                report.cancelled = True
                break
            if i % 20 == 0 or i == len(files) - 1:
                progress(self._fraction(), self._message(i + 1, len(files), report))
        if not report.cancelled and self._flush(pending, report, progress, should_stop):
            self._drop_missing(folder, seen, report)
        else:
            report.cancelled = True
        self._finish(report, t0)
        return report

    # ---- per file ---------------------------------------------------------------------------------------
    def _one_file(self, found: FoundFile, folder: Path, pending: _Pending, report: IngestReport) -> None:
        key, files = str(found.path), self._manifest["files"]
        display = f"{folder.name}/{found.path.relative_to(folder).as_posix()}"
        prev = files.get(key)
        if prev and prev["size"] == found.size and prev["mtime_ns"] == found.mtime_ns:
            report.files_unchanged += 1
            self._done_bytes += found.size
            return
        if found.size > self.max_file_bytes:
            self._done_bytes += found.size
            report.skip(
                display,
                f"{found.size / 2**20:.2f} MB is over the {self.max_file_bytes / 2**20:g} MB limit",
                "too large",
            )
            self._forget(key, prev, pending)
            return
        try:
            data = found.path.read_bytes()
        except OSError as e:
            report.skip(display, f"cannot be read ({e.strerror or e})")
            return
        digest = hashlib.sha256(data).hexdigest()
        if prev and prev["hash"] == digest:
            prev["mtime_ns"] = found.mtime_ns  # touched, not changed
            report.files_unchanged += 1
            self._done_bytes += found.size
            return
        try:
            doc = read_document(found.path, data)
        except SkipFile as e:
            self._done_bytes += found.size
            report.skip(display, str(e))
            self._forget(key, prev, pending)
            return
        chunks = chunk_document(doc, self.chunking)
        if not chunks:
            self._done_bytes += found.size
            report.skip(display, "no text in it (empty or whitespace only)")
            self._forget(key, prev, pending)
            return
        self._stage(key, display, found, digest, doc.kind, doc.encoding, chunks, pending)

    def _stage(
        self,
        key: str,
        display: str,
        found: FoundFile,
        digest: str,
        kind: str,
        encoding: str,
        chunks: list[Chunk],
        pending: _Pending,
    ) -> None:
        fid = _file_id(key)
        for n, c in enumerate(chunks):
            pending.ids.append(f"{fid}-{n}")
            pending.chunks.append(c)
            pending.metas.append(
                {
                    "path": key,
                    "display": display,
                    "start_line": c.start_line,
                    "end_line": c.end_line,
                    "page": c.page,
                    "heading": c.heading[:200],
                    "kind": kind,
                }
            )
        pending.files[key] = {
            "hash": digest, "size": found.size, "mtime_ns": found.mtime_ns, "chunks": len(chunks),
            "display": display, "kind": kind, "encoding": encoding,
        }  # fmt: skip
        pending.bytes += found.size

    def _forget(self, key: str, prev: dict | None, pending: _Pending) -> None:
        """A file that was indexed but no longer can be: its old chunks go in the next flush."""
        if prev is not None:
            pending.files[key] = {}

    # ---- batches ----------------------------------------------------------------------------------------
    def _flush(self, pending: _Pending, report: IngestReport, progress: Progress, should_stop: Stop) -> bool:
        """Embed and write the pending chunks; False (nothing written) when stopped while embedding."""
        if not pending.files:
            return True
        parts = []
        for lo in range(0, len(pending.ids), self.flush_chunks):
            if should_stop():
                return False
            texts = [c.embedding_text() for c in pending.chunks[lo : lo + self.flush_chunks]]
            parts.append(self._embed_cached(texts))
            done = self._done_bytes + pending.bytes * (lo + len(texts)) / len(pending.ids)
            progress(min(0.99, done / self._total_bytes), f"embedding: {lo + len(texts)}/{len(pending.ids)} "
                     f"chunks of this batch · {report.chunks_added} written so far")  # fmt: skip
        keys = list(pending.files)
        self._col.delete(where={"path": {"$in": keys}} if len(keys) > 1 else {"path": keys[0]})
        if parts:
            vectors = np.concatenate(parts)
            for lo in range(0, len(pending.ids), 1000):
                hi = lo + 1000
                self._col.upsert(
                    ids=pending.ids[lo:hi],
                    embeddings=vectors[lo:hi],
                    documents=[c.text for c in pending.chunks[lo:hi]],
                    metadatas=pending.metas[lo:hi],
                )
        files = self._manifest["files"]
        for key, entry in pending.files.items():
            if entry:
                report.files_indexed += 1
                report.chunks_added += entry["chunks"]
                files[key] = entry
            else:
                files.pop(key, None)
        self._manifest["version"] = int(self._manifest.get("version", 0)) + 1
        self._done_bytes += pending.bytes
        pending.__init__()
        if time.monotonic() - self._last_save > 5.0:
            self.store.save_manifest(self.kb, self._manifest)
            self._last_save = time.monotonic()
        return True

    def _embed_cached(self, texts: list[str]) -> np.ndarray:
        keys = [hashlib.sha1(t.encode("utf-8", "surrogatepass")).hexdigest() for t in texts]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if todo:
            first = {k: t for k, t in zip(keys, texts, strict=True)}
            vectors = self.embed([first[k] for k in todo])
            if len(self._cache) + len(todo) > CACHE_LIMIT:
                self._cache.clear()
            self._cache.update(zip(todo, vectors, strict=True))
        return np.stack([self._cache[k] for k in keys]).astype(np.float32)

    def _drop_missing(self, folder: Path, seen: set[str], report: IngestReport) -> None:
        files = self._manifest["files"]
        prefix = str(folder).rstrip("/\\") + ("/" if "/" in str(folder) else "\\")
        gone = [k for k in files if k.startswith(prefix) and k not in seen]
        for lo in range(0, len(gone), 500):
            batch = gone[lo : lo + 500]
            self._col.delete(where={"path": {"$in": batch}} if len(batch) > 1 else {"path": batch[0]})
            for key in batch:
                files.pop(key, None)
        if gone:
            report.files_removed = len(gone)
            self._manifest["version"] = int(self._manifest.get("version", 0)) + 1

    def _finish(self, report: IngestReport, t0: float) -> None:
        self.store.save_manifest(self.kb, self._manifest)
        files = self._manifest["files"].values()
        report.files_total = len(files)
        report.chunks_total = sum(int(f.get("chunks", 0)) for f in files)
        report.seconds = time.perf_counter() - t0
        log.info("rag ingest %s: %s", self.kb, report.summary())

    def _fraction(self) -> float:
        return min(0.99, self._done_bytes / self._total_bytes)

    @staticmethod
    def _message(i: int, n: int, report: IngestReport) -> str:
        return (
            f"{i}/{n} files read · {report.files_indexed} indexed · {report.files_unchanged} unchanged · "
            f"{report.files_skipped} skipped · {report.chunks_added} chunks embedded"
        )
