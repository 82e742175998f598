"""Questions over your notes and code: ingest folders into knowledge bases, hybrid retrieval (vectors + BM25),
optional cross-encoder reranking, answers that cite their passages (or call tools), and an evaluation harness.

Modules: backend (RAGBackend), ingest (finding and decoding files), chunk (splitting with line numbers), indexer
(embedding and storing), store (chromadb knowledge bases), search (BM25, fusion), models (embedding and reranker
loaders, precision), answer (prompt, citations, language), respond (abstain / plain RAG / tools), tools
(search_notes, open_file, calculator), questions (question-set files), harness (evaluation metrics and runs).
"""

from backends.rag.answer import AnswerUpdate, Passage, SearchResult
from backends.rag.backend import MODES, RAGBackend, RAGConfig, create
from backends.rag.harness import EvalOptions, EvalProgress, EvalReport, evaluation_stream
from backends.rag.indexer import IngestReport
from backends.rag.questions import EvalQuestion, QuestionSetError, builtin_sets, load_question_set
from backends.rag.store import KBInfo, KnowledgeBaseError
from backends.rag.tools import ToolFailure, calculate

__all__ = [
    "MODES", "AnswerUpdate", "EvalOptions", "EvalProgress", "EvalQuestion", "EvalReport", "IngestReport", "KBInfo",
    "KnowledgeBaseError", "Passage", "QuestionSetError", "RAGBackend", "RAGConfig", "SearchResult", "ToolFailure",
    "builtin_sets", "calculate", "create", "evaluation_stream", "load_question_set",
]  # fmt: skip
