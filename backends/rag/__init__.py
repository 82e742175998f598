"""Questions over your notes and code: ingest folders into knowledge bases, hybrid retrieval (vectors + BM25), and
answers that cite their passages.

Modules: backend (RAGBackend), ingest (finding and decoding files), chunk (splitting with line numbers), indexer
(embedding and storing), store (chromadb knowledge bases), search (BM25, fusion), answer (prompt, citations).
"""

from backends.rag.answer import AnswerUpdate, Passage, SearchResult
from backends.rag.backend import MODES, RAGBackend, RAGConfig, create
from backends.rag.indexer import IngestReport
from backends.rag.store import KBInfo, KnowledgeBaseError

__all__ = [
    "MODES", "AnswerUpdate", "IngestReport", "KBInfo", "KnowledgeBaseError", "Passage", "RAGBackend", "RAGConfig",
    "SearchResult", "create",
]  # fmt: skip
