"""Search over embeddings: :class:`EmbeddingIndex` (faiss flat / HNSW / IVF / IVF-PQ with an exact
numpy fallback), saved with a sha256 manifest and the fingerprint of the model that made it, and
:func:`search_quality` (recall@k against exact search, latency)."""

from .embedding_index import (
    HAVE_FAISS,
    KINDS,
    METRICS,
    EmbeddingIndex,
    default_pq_m,
    search_quality,
)

__all__ = ["HAVE_FAISS", "KINDS", "METRICS", "EmbeddingIndex", "default_pq_m", "search_quality"]
