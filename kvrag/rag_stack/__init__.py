"""RAG on LlamaIndex + Chroma, sharing kvrag's prompt builder, engine and scoring."""
