"""How a vector is written into a store: float32 bytes in SQLite, pgvector's text form in PostgreSQL.

One encoding for every table that keeps vectors (RAG's chunks and embedding cache, a semantic cache's
entries), so an index derived from one reads the others' rows the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["pgvector_text", "vector_blob", "vectors_from_blobs"]


def vector_blob(vector: np.ndarray) -> bytes:
    """Little-endian float32 bytes."""
    return np.asarray(vector, dtype="<f4").tobytes()


def vectors_from_blobs(blobs: Sequence[bytes]) -> np.ndarray:
    """One row per blob (all of one size)."""
    return np.frombuffer(b"".join(bytes(b) for b in blobs), dtype="<f4").reshape(len(blobs), -1)


def pgvector_text(vector: np.ndarray) -> str:
    """pgvector's text form, '[0.1,0.2,...]' (no dependency on the pgvector Python package)."""
    return "[" + ",".join(f"{x:.7g}" for x in np.asarray(vector, dtype=np.float32).tolist()) + "]"
