from tabs._placeholder import not_built_tab

TAB = not_built_tab(
    "RAG",
    "Ask questions over your own notes and code: ingest folders and PDFs, embed them with the offline "
    "all-MiniLM-L6-v2 model into a local Chroma index, rerank with a cross-encoder, and answer with citations.",
)
