"""RAG on LlamaIndex + Chroma, sharing kvrag's prompt and scoring. Empty until issue 5."""
