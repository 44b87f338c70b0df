"""RAG on LlamaIndex + Chroma: ingest, retrieval to a token budget, the pipeline a ``rag``
system runs; retrieved chunks are shown as the shared prompt shows documents."""
